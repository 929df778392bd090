"""k-NN evaluation of any ViT backbone (`config.method='knn'`), as DINO's `eval_knn.py`: nothing trains.

The backbone comes from `config.model.init_from` (a DINO or DeiT workdir, DINO's teacher by default, or
a `python -m vitdistill.convert` output). Its float32 CLS features (after the final norm) of the eval
transform (resize by crop_pct, centre crop) are computed in batches on the mesh for the training split
(the memory bank) and the evaluation split (the queries), L2-normalised, and every k of `knn.ks` is
scored from one neighbour search: votes exp(cosine / T), classes ranked as `knn_classifier` ranks them.
With `knn.features_dir`, the features and labels are written there as .npy and read back by a later
run instead of being computed again.
"""
from __future__ import annotations

import jax.numpy as jnp

from vitdistill import weights
from vitdistill.data import deit_transforms
from vitdistill.data.sources import get_source
from vitdistill.errors import ConfigError
from vitdistill.evaluate import batched, knn
from vitdistill.train import loop, schedules, sharding
from vitdistill.train.reporting import markdown_table


def build_task(config, workdir: str) -> loop.Task:
    data, kcfg = config.data, config.knn
    if not kcfg.ks or min(kcfg.ks) < 1:
        raise ConfigError(f"config.knn.ks={tuple(kcfg.ks)}; give one or more k >= 1, e.g. (10, 20, 100, 200)")
    if config.epochs != 0:
        raise ConfigError("the k-NN evaluation trains nothing: leave config.epochs at 0")
    dtype = jnp.float32 if config.model.dtype in ("auto", "float32") else None  # eval_knn: float32
    backbone, params, description = weights.frozen_vit(config.model, what="k-NN", dtype=dtype)
    bank = get_source(data, data.train_split, limit=kcfg.train_limit)
    queries = get_source(data, data.eval_split, limit=kcfg.eval_limit, class_names=bank.class_names)
    mesh = sharding.make_mesh(config.get("mesh"))
    transform = deit_transforms.eval_transform_of(data)
    extract = batched.cls_features(backbone, transform=transform, global_batch=config.batch_size, mesh=mesh)

    def evaluate(state, frozen) -> dict:
        del state  # nothing trains: the backbone is the frozen input, placed by the loop
        def compute():
            train_features, train_labels = extract(frozen, bank)
            test_features, test_labels = extract(frozen, queries)
            return dict(train_features=train_features, train_labels=train_labels, test_features=test_features,
                        test_labels=test_labels)

        arrays = batched.cached_features(kcfg.features_dir, compute, what="k-NN")
        scores = knn.knn_accuracies(arrays["train_features"], arrays["train_labels"], arrays["test_features"],
                                    arrays["test_labels"], ks=tuple(int(k) for k in kcfg.ks),
                                    temperature=kcfg.temperature, num_classes=bank.num_classes)
        result = {"count": float(len(arrays["test_labels"]))}
        for k, values in scores.items():
            result.update({f"{name}_k{k}": v for name, v in values.items()})
        return result

    def summarize(final: dict) -> str:
        rows = [("k", "top-1 %", "top-5 %")]
        for k in kcfg.ks:
            top5 = final.get(f"knn_top5_k{k}")
            rows.append((str(k), f"{100 * final[f'knn_top1_k{k}']:.2f}", "-" if top5 is None else f"{100 * top5:.2f}"))
        return markdown_table(rows, title=f"k-NN (T={kcfg.temperature}) of {description} ({config.model.name}) on "
                                          f"{data.source} {data.eval_split}: {len(bank.class_names or [])} classes, "
                                          f"{bank.num_examples} train / {queries.num_examples} test images")

    return loop.evaluation_task(
        f"knn:{config.model.name}", source=bank, transform=transform, evaluate=evaluate,
        length=schedules.run_length(config, bank.num_examples), frozen=params, summarize=summarize)
