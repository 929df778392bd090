"""Evaluation over a padded, sharded evaluation set: counts summed over its batches, or features gathered.

Each batch is assembled into global arrays on the mesh; padding rows carry `mask = 0`. An image that
cannot be decoded stops the evaluation with a message naming the files of its batch.
"""
from __future__ import annotations

import functools
import itertools
import os
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tensorflow.io import gfile

from vitdistill import models
from vitdistill.data import SIZE_CHECK, pipeline, size_check_text
from vitdistill.data.sources import Source
from vitdistill.errors import BadImageError, DataError
from vitdistill.train import preemption, sharding


def _global_batches(dataset, mesh, source: Optional[Source], global_batch: int) -> Iterator[dict]:
    import tensorflow as tf

    batches = dataset.as_numpy_iterator()
    for index in itertools.count():
        preemption.check_during_eval()  # SIGTERM / Ctrl-C: stop between two batches, not after the split
        try:
            local = next(batches)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            what = source.name if source else "the evaluation data"
            if SIZE_CHECK in e.message:
                raise DataError(f"{what}: {size_check_text(e.message)}") from e
            names = (pipeline.eval_batch_examples(source, index, global_batch, jax.process_index(),
                                                  jax.process_count()) if source is not None else ["?"])
            raise BadImageError(
                f"Could not decode an image of {what}: "
                f"{e.message.splitlines()[0]}. It is one of: {names}. Remove or replace the corrupt file(s).") from e
        yield sharding.to_global(local, mesh)


def sum_counts(eval_fn: Callable, state_args: tuple, dataset, mesh, *, source: Optional[Source] = None,
               global_batch: int = 0) -> dict:
    """Sums a jitted `eval_fn(*state_args, batch) -> {name: count}` over the batches of `dataset`.

    With `source` and `global_batch`, an undecodable image stops it naming the batch's files.
    """
    totals = None
    for batch in _global_batches(dataset, mesh, source, global_batch):
        counts = eval_fn(*state_args, batch)
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    return {k: float(v) for k, v in sharding.to_host(totals).items()} if totals is not None else {}


def extract_features(feature_fn: Callable, state_args: tuple, source: Source, transform: Callable, *,
                     global_batch: int, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of every example of `source`, in order: a jitted `feature_fn(*state_args, batch)`
    over the eval transform's batches, padding dropped."""
    dataset, _ = pipeline.eval_dataset(source, transform, global_batch=global_batch,
                                       process_index=jax.process_index(), process_count=jax.process_count())
    feats, labels, masks = [], [], []
    for batch in _global_batches(dataset, mesh, source, global_batch):
        f, l, m = sharding.to_host((feature_fn(*state_args, batch), batch["label"], batch["mask"]))
        feats.append(f), labels.append(l), masks.append(m)
    keep = np.concatenate(masks) > 0
    return np.concatenate(feats)[keep], np.concatenate(labels)[keep]


def cls_features(backbone, *, transform: Callable, global_batch: int, mesh) -> Callable:
    """`(params, source) -> (features, labels)`: float32 CLS features (after the final norm) of a ViT made
    with `num_classes=0`, on `transform` (the eval transform, `deit_transforms.eval_transform_of`), as DINO's
    k-NN extracts them; DINO's evaluation during training and the k-NN method both use it."""

    @jax.jit
    def features(params, batch):
        return backbone.apply({"params": params}, batch["image"], train=False).astype(jnp.float32)

    def extract(params, source: Source):
        return extract_features(features, (params,), source, transform, global_batch=global_batch, mesh=mesh)

    return extract


FEATURE_FILES = ("train_features", "train_labels", "test_features", "test_labels")


def cached_features(directory: Optional[str], compute: Callable[[], dict], *, what: str) -> dict:
    """The arrays of FEATURE_FILES: read from `directory` (.npy files) when a run saved them there, else
    `compute()`d and, with a `directory`, written there by process 0 for the next run."""
    if directory and all(gfile.exists(os.path.join(directory, f"{name}.npy")) for name in FEATURE_FILES):
        arrays = {}
        for name in FEATURE_FILES:
            with gfile.GFile(os.path.join(directory, f"{name}.npy"), "rb") as f:
                arrays[name] = np.load(f)
        if jax.process_index() == 0:
            print(f"{what}: features read from {directory}", flush=True)
        return arrays
    arrays = compute()
    if directory and jax.process_index() == 0:
        gfile.makedirs(directory)
        for name in FEATURE_FILES:
            with gfile.GFile(os.path.join(directory, f"{name}.npy"), "wb") as f:
                np.save(f, arrays[name])
    return arrays


def block_features(backbone, params, images, *, n_last_blocks: int, avgpool: bool):
    """float32 [B, dim]: DINO eval_linear's features of a frozen ViT made with `num_classes=0`: the CLS token
    of each of the last `n_last_blocks` blocks through the final norm, concatenated; with `avgpool`, the mean
    of the last block's normed patch tokens interleaved with them (`get_intermediate_layers`)."""
    _, state = backbone.apply({"params": params}, images, train=False, mutable=["intermediates"])
    blocks = state["intermediates"]
    norm_module = models.vit._layer_norm(dtype=backbone.dtype, param_dtype=backbone.param_dtype, name=None)
    norm = functools.partial(norm_module.apply, {"params": params["norm"]})  # the backbone's final norm
    last = [norm(blocks[f"blocks_{i}"]["tokens"][0]) for i in range(backbone.depth - n_last_blocks, backbone.depth)]
    output = jnp.concatenate([x[:, 0] for x in last], axis=-1)
    if avgpool:  # torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1): interleaved
        prefix = 2 if backbone.distilled else 1
        output = jnp.stack([output, jnp.mean(last[-1][:, prefix:], axis=1)], axis=-1).reshape(output.shape[0], -1)
    return output.astype(jnp.float32)
