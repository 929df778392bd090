"""tf.data assembly: index streams, per-process shards, transforms, batches.

The training stream is a pure function of (seed, position). An epoch is `S` global batches of `G`
examples (`data.steps_per_epoch`: `S = N // G`, as DistributedSampler with drop_last gives them;
with DeiT's repeated augmentation RASampler's `N // 256 * 256` positions, then `// G`), so
`L = S * G` positions: stream position `p` holds example `perm_e[p - e*L]` of epoch `e = p // L`,
where `perm_e` is a permutation drawn from (seed, e) whose last `N - L` entries that epoch drops
(each epoch starts a new order on a batch boundary, and a batch never spans two epochs; the linear
probe's epochs, `keep_partial`, are `ceil(N / G)` batches instead, their `L - N` last positions a masked
repeat of the permutation's start), and its
augmentation is seeded from (seed, p). Global batch `b` covers positions `[b*G, (b+1)*G)`. Its
rows are split over the D devices (batch shards) in `jax.devices()` order, B = G/D each, and
device `d` takes every D-th position: its row `j` is position `b*G + j*D + d`, as
DistributedSampler and DeiT's RASampler give rank `d` every D-th index; so the
repeated-augmentation copies of an image, adjacent in the stream, land on different devices
(and processes). Process `k` holds the rows of its own devices. Resuming at step `s` therefore
starts at position `s*G` and sees exactly the batches the uninterrupted run would have seen, on
the same devices.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import tensorflow as tf

from vitdistill.data import sources, steps_per_epoch
from vitdistill.data.sources import Source, get_source
from vitdistill.errors import ConfigError

AUTOTUNE = tf.data.AUTOTUNE
# (uint8 image, seed [2]) -> {view name: image}; one with `decodes` = True also takes (encoded bytes, seed, jpeg=)
Transform = Callable[[tf.Tensor, tf.Tensor], dict]
_NEVER_ENDING = 2 ** 40


@dataclasses.dataclass(frozen=True)
class TrainData:
    """A method's training data: the source, its per-example transform, how many times in a row each
    example is repeated (DeiT's repeated augmentation; 1 elsewhere), and whether an epoch keeps its last
    partial batch (the linear probe, as eval_linear.py's loader: padded, with a `mask`) or drops it."""

    source: Source
    transform: Transform
    repeats: int = 1
    keep_partial: bool = False


def stream_seed(seed: int, purpose: int, counter) -> tf.Tensor:
    """A stateless seed for (run seed, purpose, counter): purposes keep shuffles and augmentations apart."""
    base = tf.constant([seed, purpose], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(counter, tf.int64))


def epoch_permutation(num_examples: int, seed: int, epoch, repeats: int = 1) -> tf.Tensor:
    """The example order of one epoch; with `repeats` > 1 each example appears `repeats` times in a row
    and the epoch still has `num_examples` positions (DeiT's repeated augmentation: an epoch then covers
    1/repeats of the distinct images)."""
    keys = tf.random.stateless_uniform([num_examples], seed=stream_seed(seed, 0, epoch), minval=None, maxval=None,
                                       dtype=tf.int64)
    perm = tf.cast(tf.argsort(keys, stable=True), tf.int64)
    if repeats > 1:
        perm = tf.repeat(perm, repeats)[:num_examples]
    return perm


def index_stream(num_examples: int, *, seed: int, start_position: int = 0, repeats: int = 1,
                 epoch_length: int | None = None) -> tf.data.Dataset:
    """An endless dataset of (position, example index), starting at `start_position`: epochs of
    `epoch_length` positions (all `num_examples` by default), each the start of a new permutation. An epoch
    longer than `num_examples` (a kept partial batch padded to a whole one) repeats its permutation's start
    at the positions past `num_examples` (`is_padding` tells them)."""
    length = num_examples if epoch_length is None else epoch_length
    if length < 1:
        raise ValueError(f"epoch_length={epoch_length} for {num_examples} examples")
    start_epoch = start_position // length

    def one_epoch(epoch):
        positions = epoch * length + tf.range(length, dtype=tf.int64)
        order = epoch_permutation(num_examples, seed, epoch, repeats)
        if length > num_examples:
            order = tf.tile(order, [-(-length // num_examples)])
        order = order[:length]
        return tf.data.Dataset.from_tensor_slices((positions, order))

    epochs = tf.data.Dataset.range(start_epoch, _NEVER_ENDING)
    return epochs.flat_map(one_epoch).skip(start_position - start_epoch * length)


def epoch_positions(num_examples: int, global_batch: int, repeats: int = 1, keep_partial: bool = False) -> int:
    """The positions of a training epoch: whole global batches (`data.steps_per_epoch`), the rest dropped, or
    with `keep_partial` the last batch padded to a whole one."""
    return steps_per_epoch(num_examples, global_batch, repeats, keep_partial) * global_batch


def is_padding(position, num_examples: int, epoch_length: int):
    """Whether a stream position fills a kept partial batch (an epoch longer than `num_examples`)."""
    return position % epoch_length >= num_examples


def _plain(fn: Callable) -> Callable:
    """`fn` traced as written, without AutoGraph's source rewriting: the transforms use tf.cond and
    tf.while_loop themselves, and AutoGraph's conversion was 10 of the 16 s a DINO pipeline took to build."""
    return tf.autograph.experimental.do_not_convert(fn)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    options.threading.private_threadpool_size = 0
    return options


def process_rows(global_batch: int, process_index: int = 0, process_count: int = 1, num_shards: int = 1):
    """The offsets within a global batch of this process's rows, in row order: for each of its devices
    (`num_shards // process_count` of the `num_shards`, process-major), every `num_shards`-th position."""
    import numpy as np

    if global_batch % process_count:
        raise ConfigError(f"batch_size {global_batch} is not divisible by the {process_count} processes")
    num_shards = max(num_shards, process_count)
    if num_shards % process_count or global_batch % num_shards:
        raise ConfigError(f"batch_size {global_batch} cannot be split over {num_shards} devices in {process_count} "
                          f"processes; use a multiple of {num_shards} (--config.batch_size=...)")
    per_process = num_shards // process_count
    shards = np.arange(process_index * per_process, (process_index + 1) * per_process)
    slots = np.arange(global_batch // num_shards)
    return (slots[None, :] * num_shards + shards[:, None]).reshape(-1)


def train_dataset(source: Source, transform: Transform, *, seed: int, global_batch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1, num_shards: int = 1, repeats: int = 1,
                  prefetch: int = 2, keep_partial: bool = False) -> tf.data.Dataset:
    """This process's endless stream of training batches, each `global_batch // process_count` examples.

    `num_shards` is the number of devices the global batch is split over (all processes' together). With
    `keep_partial` each epoch ends on its partial batch, padded to a whole one; every example then has a `mask`
    (float32: 0 for the padding; 1 everywhere for a sequential source, which has no epochs)."""
    rows = process_rows(global_batch, process_index, process_count, num_shards)
    local_batch = len(rows)

    decodes = getattr(transform, "decodes", False)  # takes bytes (DeiT's): it decodes its crop's window alone

    def prepare(position, example):
        if "encoded" in example:
            views = transform(example["encoded"], stream_seed(seed, 1, position), jpeg=source.jpeg)
        else:
            views = transform(example["image"], stream_seed(seed, 1, position))
        return {**views, "label": example["label"]}

    if source.random_access:
        load = source.load_encoded if decodes and source.load_encoded is not None else source.load
        epoch_length = epoch_positions(source.num_examples, global_batch, repeats, keep_partial)
        positions = index_stream(source.num_examples, seed=seed, start_position=start_step * global_batch,
                                 repeats=repeats, epoch_length=epoch_length).batch(global_batch)
        rows_t = tf.constant(rows, tf.int64)

        def mine(position, index):
            return tf.gather(position, rows_t), tf.gather(index, rows_t)

        def load_and_prepare(position, index):
            example = prepare(position, load(index))
            if keep_partial:
                example["mask"] = tf.cast(~is_padding(position, source.num_examples, epoch_length), tf.float32)
            return example

        ds = positions.map(mine).unbatch().map(_plain(load_and_prepare), num_parallel_calls=AUTOTUNE)
    else:
        # Sequential sources (TFDS in TFRecords): a seeded shuffle that restarts from a new seed on resume, of the
        # encoded images where the source gives them (a fifth of the memory or less), decoded after it: by the
        # transform that decodes its crop alone, else here (and once for the repeated copies)
        encoded = source.sequential_encoded is not None
        ds = (source.sequential_encoded if encoded else source.sequential)(process_index, process_count,
                                                                          seed + start_step)
        ds = ds.repeat().shuffle(16 * local_batch, seed=seed + start_step)
        if encoded and (repeats > 1 or not decodes):
            ds = ds.map(_plain(sources.decoded(source.jpeg)), num_parallel_calls=AUTOTUNE)
        if repeats > 1:
            ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats))
        first = start_step * global_batch + process_index * local_batch
        ds = ds.enumerate(first).map(_plain(prepare), num_parallel_calls=AUTOTUNE)
        if keep_partial:
            ds = ds.map(lambda example: {**example, "mask": tf.constant(1.0)})
    ds = ds.batch(local_batch, drop_remainder=True)
    local_devices = max(num_shards, process_count) // process_count
    if not source.random_access and local_devices > 1:
        # consecutive examples (a repeated image's copies) to different devices of this process, as RASampler
        # gives them to different ranks: device k takes the batch's k-th, (k + D)-th, ... example, the rule the
        # random-access rows follow (a process's devices only: each process reads its own part of the files)
        order = tf.constant(process_rows(local_batch, 0, 1, local_devices), tf.int64)
        ds = ds.map(lambda batch: tf.nest.map_structure(lambda rows: tf.gather(rows, order), batch))
    return ds.prefetch(prefetch).with_options(_options())


# `multicrop.device_ops` of a view with every photometric op on: the jitter in its default order with factors 1.0
# (float32 bits 1065353216), a hue shift of 10 levels, grayscale, the blur's box for sigma 1 (r = 0, ww = 2^24 / 1.5
# in float32, fw = (2^24 - ww) // 2), solarisation. A step computes every op whatever the choices; these keep them
# real (tests/test_device_photometric.py checks them against `multicrop.device_ops`).
EVERY_DEVICE_OP = (1, 0, 1, 2, 3, 1065353216, 1065353216, 1065353216, 10, 1, 1, 0, 11184811, 2796202, 1)


def random_batch(data: TrainData, global_batch: int, seed: int = 0) -> dict:
    """Random numpy inputs shaped as `data`'s training batches of `global_batch` examples (from the
    pipeline's element spec), as `random_arrays` fills them. For benchmarks and tests of a step."""
    spec = train_dataset(data.source, data.transform, seed=0, global_batch=global_batch,
                         repeats=data.repeats, keep_partial=data.keep_partial).element_spec
    shapes = {name: (tuple(s.shape), s.dtype.as_numpy_dtype) for name, s in spec.items()}
    return random_arrays(shapes, data.source.num_classes, seed)


def random_arrays(shapes: dict, num_classes: int, seed: int = 0) -> dict:
    """{name: (shape, dtype)} -> random numpy arrays, filled in name order: normal images (uint8 ones uniform
    over 0..255), labels uniform over `num_classes`, DeiT's erase boxes all off. Needs no TensorFlow
    (experiments/accelerator_bench.py shapes its batches from the config)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    batch = {}
    for name in sorted(shapes):
        shape, dtype = shapes[name][0], np.dtype(shapes[name][1])
        if name == "mask":  # a kept partial batch's padding: none
            batch[name] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            batch[name] = rng.randn(*shape).astype(dtype)
        elif dtype == np.uint8:
            batch[name] = rng.randint(0, 256, shape).astype(dtype)
        elif name == "erase":
            batch[name] = np.zeros(shape, dtype)
        elif name.endswith("_ops"):  # a DINO view's photometric choices (image_ops='device'): every op on
            batch[name] = np.broadcast_to(np.asarray(EVERY_DEVICE_OP, dtype), shape).copy()
        elif name.endswith("_windows"):  # a DINO view's crop into the canvas (device_canvas): taps inside it
            batch[name] = rng.randint(0, shapes["canvas"][0][1], shape).astype(dtype)
        else:
            batch[name] = rng.randint(0, num_classes, shape).astype(dtype)
    return batch


def eval_dataset(source: Source, transform: Callable[[tf.Tensor], dict], *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> tuple[tf.data.Dataset, int]:
    """This process's evaluation batches, padded so every example counts exactly once.

    Each process takes a contiguous slice; all processes yield the same number of batches
    (required for the global arrays), padding with `mask = 0` examples. Returns the dataset
    and its number of batches.
    """
    local_batch = global_batch // process_count
    n = source.num_examples
    per_process = math.ceil(n / process_count)
    num_batches = math.ceil(per_process / local_batch)
    padded = num_batches * local_batch

    def prepare(example, mask):
        return {**transform(example["image"]), "label": example["label"], "mask": mask}

    if source.random_access:
        start = process_index * per_process
        end = min(n, start + per_process)
        def load_and_prepare(index):
            return prepare(source.load(tf.minimum(index, n - 1)), tf.cast(index < end, tf.float32))

        ds = tf.data.Dataset.range(start, start + padded).map(_plain(load_and_prepare), num_parallel_calls=AUTOTUNE)
    else:
        real = source.sequential(process_index, process_count, 0).map(_plain(lambda ex: prepare(ex, tf.constant(1.0))),
                                                                        num_parallel_calls=AUTOTUNE)
        filler = real.take(1).map(lambda ex: {**{k: tf.zeros_like(v) for k, v in ex.items() if k != "mask"},
                                              "mask": tf.constant(0.0)})
        ds = real.concatenate(filler.repeat()).take(padded)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(2).with_options(_options()), num_batches


def batch_examples(source: Source, step: int, config, repeats: int = 1, process_index: int = 0,
                   process_count: int = 1, num_shards: int = 1, limit: int = 20, keep_partial: bool = False) -> list:
    """Names the examples of this process's share of training batch `step` (to find a corrupt file)."""
    if not source.random_access:
        return [f"(a record of {source.name}; sequential sources cannot name it)"]
    global_batch = config.batch_size
    stream = index_stream(source.num_examples, seed=config.seed, start_position=step * global_batch, repeats=repeats,
                          epoch_length=epoch_positions(source.num_examples, global_batch, repeats, keep_partial))
    indices = [int(i) for _, i in stream.take(global_batch).as_numpy_iterator()]
    mine = [indices[r] for r in process_rows(global_batch, process_index, process_count, num_shards)]
    return [source.describe(i) for i in sorted(set(mine))][:limit]


def eval_batch_examples(source: Source, batch_index: int, global_batch: int, process_index: int = 0,
                        process_count: int = 1, limit: int = 20) -> list:
    """Names the examples of this process's evaluation batch `batch_index` (to find a corrupt file)."""
    if not source.random_access:
        return [f"(a record of {source.name}; sequential sources cannot name it)"]
    local_batch = global_batch // process_count
    per_process = math.ceil(source.num_examples / process_count)
    first = process_index * per_process + batch_index * local_batch
    last = min(first + local_batch, (process_index + 1) * per_process, source.num_examples)
    return [source.describe(i) for i in range(first, last)][:limit]


def check_batch_divides(global_batch, num_devices: int) -> None:
    """`config.batch_size` is a positive number of images that the devices share evenly."""
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise ConfigError(f"config.batch_size={global_batch!r}: it must be a positive number of images (the global "
                          "batch, over all devices and hosts), e.g. --config.batch_size=64")
    if global_batch % num_devices:
        raise ConfigError(f"config.batch_size={global_batch} is not divisible by the {num_devices} devices; use a "
                          f"multiple of {num_devices}, e.g. "
                          f"--config.batch_size={max(num_devices, global_batch // num_devices * num_devices)}")


def check_batch_size(global_batch: int, num_devices: int, num_examples: int, what: str) -> None:
    check_batch_divides(global_batch, num_devices)
    if global_batch > num_examples:
        raise ConfigError(f"batch_size {global_batch} is larger than the {num_examples} examples of {what}; "
                         f"lower --config.batch_size")


def check_training_split(config, num_devices: int) -> Source:
    """The training split of `config.data`, checked to hold one batch of `config.batch_size`."""
    data = config.data
    source = get_source(data, data.train_split, limit=data.train_limit)
    check_batch_size(config.batch_size, num_devices, source.num_examples, source.name)
    return source
