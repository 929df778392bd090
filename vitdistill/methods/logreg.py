"""Logistic-regression probe of a frozen ViT (`config.method='logreg'`): the transfer protocol of SimCLR and
CLIP, where DINO's `eval_linear.py` (`method='linear'`) trains by SGD on augmented crops; nothing trains in
the loop.

The backbone comes from `config.model.init_from`, as for the k-NN. Its features (eval_linear's: the CLS of
the last `n_last_blocks` blocks through the final norm, optionally with the mean patch token) are computed
once, on the eval transform, for the training and the test split. For each strength in `logreg.l2s` an
l2-regularised multinomial logistic regression is fitted by L-BFGS (`vitdistill.evaluate.logistic`) on the
training examples outside a seeded validation split (`val_fraction`); the strength with the best validation
top-1 is refitted on all training examples and scored once on the test split. The test split never picks
anything. With `logreg.features_dir` the features are kept as .npy and read back by a later run.

Where it differs from `method='linear'`: no augmentation and a fit to convergence, so it needs no learning
rate or epoch count, costs seconds once the features exist, and on small data is the stronger probe.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vitdistill import weights
from vitdistill.data import deit_transforms
from vitdistill.data.sources import get_source
from vitdistill.errors import ConfigError
from vitdistill.evaluate import batched, logistic
from vitdistill.train import loop, schedules, sharding
from vitdistill.train.reporting import markdown_table


def build_task(config, workdir: str) -> loop.Task:
    del workdir
    data, lcfg = config.data, config.logreg
    if config.epochs != 0:
        raise ConfigError("the logistic-regression probe trains nothing in the loop: leave config.epochs at 0")
    if lcfg.n_last_blocks < 1:
        raise ConfigError(f"config.logreg.n_last_blocks={lcfg.n_last_blocks}; use 1 or more")
    if lcfg.avgpool_patchtokens and lcfg.n_last_blocks != 1:
        raise ConfigError("config.logreg.avgpool_patchtokens needs n_last_blocks=1 (eval_linear.py interleaves the "
                          "CLS and mean patch features, which only lines up for one block)")
    if not lcfg.l2s or min(lcfg.l2s) < 0:
        raise ConfigError(f"config.logreg.l2s={tuple(lcfg.l2s)}; give one or more strengths >= 0, e.g. (1e-5, 1e-4)")
    if len(lcfg.l2s) > 1 and not 0 < lcfg.val_fraction < 1:
        raise ConfigError(f"config.logreg.val_fraction={lcfg.val_fraction}; choosing among {len(lcfg.l2s)} l2 "
                          "strengths needs a validation share between 0 and 1, e.g. 0.1")
    dtype = jnp.float32 if config.model.dtype in ("auto", "float32") else None
    backbone, params, description = weights.frozen_vit(config.model, what="the logistic-regression probe", dtype=dtype)
    if lcfg.n_last_blocks > backbone.depth:
        raise ConfigError(f"config.logreg.n_last_blocks={lcfg.n_last_blocks} but {config.model.name} has "
                          f"{backbone.depth} blocks")
    train = get_source(data, data.train_split, limit=lcfg.train_limit)
    test = get_source(data, data.eval_split, limit=lcfg.eval_limit, class_names=train.class_names)
    mesh = sharding.make_mesh(config.get("mesh"))

    transform = deit_transforms.eval_transform_of(data)
    feature_fn = jax.jit(lambda p, batch: batched.block_features(
        backbone, p, batch["image"], n_last_blocks=int(lcfg.n_last_blocks), avgpool=bool(lcfg.avgpool_patchtokens)))
    extract = functools.partial(batched.extract_features, feature_fn, transform=transform,
                                global_batch=config.batch_size, mesh=mesh)

    def evaluate(state, frozen) -> dict:
        del state  # nothing trains: the backbone is the frozen input, placed by the loop

        def compute():
            train_features, train_labels = extract((frozen,), train)
            test_features, test_labels = extract((frozen,), test)
            return dict(train_features=train_features, train_labels=train_labels, test_features=test_features,
                        test_labels=test_labels)

        arrays = batched.cached_features(lcfg.features_dir, compute, what="logistic regression")
        chosen = logistic.select_and_fit(arrays["train_features"], arrays["train_labels"],
                                         num_classes=train.num_classes, l2s=lcfg.l2s, val_fraction=lcfg.val_fraction,
                                         seed=config.seed, max_iter=int(lcfg.max_iter), tol=float(lcfg.tol))
        result = {"count": float(len(arrays["test_labels"])), "l2": chosen["l2"],
                  "iterations": float(chosen["model"]["iterations"]), "objective": chosen["model"]["objective"],
                  **logistic.scores(chosen["model"], arrays["test_features"], arrays["test_labels"]),
                  **{f"val_top1_l2_{l2:g}": v for l2, v in chosen["val_top1"].items()}}
        if chosen["model"]["iterations"] >= lcfg.max_iter and jax.process_index() == 0:
            print(f"logistic regression: the fit with l2 {chosen['l2']:g} stopped at max_iter={lcfg.max_iter} before "
                  f"its gradient fell below tol={lcfg.tol:g}; raise config.logreg.max_iter for a tighter fit",
                  flush=True)
        return result

    def summarize(final: dict) -> str:
        rows = [("l2", "validation top-1 %", "test top-1 %", "test top-5 %")]
        for l2 in sorted(float(x) for x in lcfg.l2s):
            chosen = l2 == final["l2"]
            val = final.get(f"val_top1_l2_{l2:g}")
            rows.append((f"{l2:g}" + (" (chosen)" if chosen else ""), "-" if val is None else f"{100 * val:.2f}",
                         f"{100 * final['top1']:.2f}" if chosen else "-",
                         f"{100 * final['top5']:.2f}" if chosen and "top5" in final else "-"))
        features = f"CLS of the last {lcfg.n_last_blocks} block(s)" + (" + mean patch token"
                                                                        if lcfg.avgpool_patchtokens else "")
        return markdown_table(rows, title=f"logistic regression on {description} ({config.model.name}; {features}) "
                                          f"on {data.source} {data.eval_split}: {train.num_examples} train "
                                          f"({lcfg.val_fraction:g} held out to choose l2) / {test.num_examples} test")

    return loop.evaluation_task(f"logreg:{config.model.name}", source=train, transform=transform, evaluate=evaluate,
                                length=schedules.run_length(config, train.num_examples), frozen=params,
                                summarize=summarize)
