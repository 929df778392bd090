"""The data stream: deterministic by position, sharded by process, padded eval sets, sources."""
import gzip
import os
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf
from ml_collections import ConfigDict

from vitdistill.data import pipeline, sources
from vitdistill.errors import ConfigError, DataError


def _toy(n=10, size=4):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 3), np.uint8)
    return sources.in_memory("toy", images, np.arange(n) % 3, 3)


def _identity(image, seed):
    noise = tf.random.stateless_uniform([], seed)
    return {"image": tf.cast(image, tf.float32), "noise": noise}


def _ids(ds, steps):
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(steps)]


def test_index_stream_is_a_permutation_per_epoch_and_resumes_exactly():
    stream = [int(i) for _, i in pipeline.index_stream(10, seed=0).take(30).as_numpy_iterator()]
    for e in range(3):
        assert sorted(stream[10 * e:10 * (e + 1)]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new order each epoch
    resumed = [int(i) for _, i in pipeline.index_stream(10, seed=0, start_position=13).take(17).as_numpy_iterator()]
    assert resumed == stream[13:]
    other_seed = [int(i) for _, i in pipeline.index_stream(10, seed=1).take(10).as_numpy_iterator()]
    assert other_seed != stream[:10]


def test_repeated_augmentation_repeats_each_image_in_a_row_and_keeps_the_epoch_length():
    stream = [int(i) for _, i in pipeline.index_stream(12, seed=0, repeats=3).take(12).as_numpy_iterator()]
    assert [stream[i] for i in range(0, 12, 3)] == [stream[i + 1] for i in range(0, 12, 3)]
    assert [stream[i] for i in range(0, 12, 3)] == [stream[i + 2] for i in range(0, 12, 3)]
    assert len(set(stream)) == 4  # an epoch covers a third of the distinct images


def test_an_epoch_drops_its_last_partial_batch_and_the_next_starts_a_new_order():
    """DistributedSampler + DataLoader(drop_last=True), as official DINO and DeiT read an epoch: a new
    permutation each epoch, len(perm) // batch batches of it, the rest dropped. 10 examples at batch 4: each
    epoch is 2 batches of the epoch's permutation's first 8 (chained epochs put the tail of one epoch and the
    head of the next in one batch, one image twice in it)."""
    src = _toy(10)
    batches = [b["image"][:, 0, 0, 0].astype(int).tolist()
               for b in _ids(pipeline.train_dataset(src, _identity, seed=5, global_batch=4), 8)]
    for epoch in range(4):
        perm = pipeline.epoch_permutation(10, 5, epoch).numpy().tolist()
        assert batches[2 * epoch] + batches[2 * epoch + 1] == perm[:8]
    resumed = [b["image"][:, 0, 0, 0].astype(int).tolist()
               for b in _ids(pipeline.train_dataset(src, _identity, seed=5, global_batch=4, start_step=3), 5)]
    assert resumed == batches[3:]


def test_repeated_augmentation_keeps_rasamplers_epoch():
    """DeiT's RASampler (samplers.py), written out: rank r of W yields floor(N // 256 * 256 / W) of the
    3-times-repeated permutation, and the loader drop_last batches of B of them."""
    import math

    from vitdistill import data

    for n in (600, 1000, 50_000, 1_281_167):
        for world, per_rank in ((1, 8), (2, 64), (4, 32), (16, 64)):
            if world * per_rank > n // 256 * 256:
                continue  # the official epoch is empty (the error below)
            official = int(math.floor(n // 256 * 256 / world)) // per_rank
            assert data.steps_per_epoch(n, world * per_rank, repeats=3) == official, (n, world, per_rank)
            assert data.steps_per_epoch(n, world * per_rank) == n // (world * per_rank)  # no repeats: N // G
    assert data.steps_per_epoch(60, 12, repeats=3) == 5  # under 256 RASampler keeps nothing: the whole set
    with pytest.raises(ConfigError, match=r"larger than the 256 positions an epoch of repeated augmentation keeps "
                                          r"of the 300 training examples .* --config.augment.repeats=1"):
        data.steps_per_epoch(300, 512, repeats=3)
    # 600 examples at 64: 8 batches an epoch (512 positions: 170 images 3 times, one twice), then a new order
    stream = [int(i) for _, i in pipeline.index_stream(600, seed=2, repeats=3, epoch_length=512).take(1024)
              .as_numpy_iterator()]
    for epoch in range(2):
        perm = pipeline.epoch_permutation(600, 2, epoch).numpy()
        assert stream[512 * epoch:512 * (epoch + 1)] == np.repeat(perm, 3)[:512].tolist()
    assert pipeline.epoch_positions(600, 64, repeats=3) == 512
    from vitdistill.train import schedules  # DeiT's schedules count the same epochs (run_length's `repeats`)

    config = ConfigDict({"epochs": 2.0, "batch_size": 64, "max_steps": None})
    assert schedules.run_length(config, 600, repeats=3) == schedules.RunLength(8, 16)
    assert schedules.run_length(config, 600) == schedules.RunLength(9, 18)


def test_the_linear_probes_epochs_keep_their_partial_batch_padded_and_masked():
    """eval_linear.py's loader has no drop_last: an epoch of 10 images at batch 4 is 3 steps, the last holding 2
    images. Here every epoch's 3 batches hold each image once with mask 1 and 2 padding rows with mask 0 (the
    first of the permutation again, as DistributedSampler pads); the next epoch is a new permutation; a resume at
    step 4 gives the same batches and masks; with 2 processes, each holds its rows of them; the schedules count
    3 steps an epoch. Sequential sources (no epochs) mask nothing."""
    from ml_collections import ConfigDict

    from vitdistill.train import schedules

    src = _toy(10)
    stream = lambda **kw: pipeline.train_dataset(src, _identity, seed=2, global_batch=4, keep_partial=True, **kw)  # noqa: E731
    batches = _ids(stream(), 9)
    for epoch in range(3):
        images = np.concatenate([b["image"][:, 0, 0, 0] for b in batches[3 * epoch:3 * epoch + 3]]).astype(int)
        masks = np.concatenate([b["mask"] for b in batches[3 * epoch:3 * epoch + 3]])
        assert masks.tolist() == [1.0] * 10 + [0.0] * 2
        perm = pipeline.epoch_permutation(10, 2, epoch).numpy()
        assert images.tolist() == perm.tolist() + perm[:2].tolist()
    for a, b in zip(batches[4:], _ids(stream(start_step=4), 5)):
        for key in ("image", "noise", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
    for k in range(2):
        for a, b in zip(batches, _ids(stream(process_index=k, process_count=2), 9)):
            np.testing.assert_array_equal(b["mask"], a["mask"][k::2])
    config = ConfigDict({"epochs": 2.0, "batch_size": 4, "max_steps": None})
    assert schedules.run_length(config, 10, keep_partial=True) == schedules.RunLength(3, 6)
    assert schedules.run_length(config, 10) == schedules.RunLength(2, 4)
    assert pipeline.epoch_positions(10, 64, keep_partial=True) == 64  # one batch larger than the data: 10 real
    in_order = sources.Source("in_order", 10, 3, sequential=lambda index, count, seed: tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros((10, 4, 4, 3), np.uint8), "label": np.arange(10) % 3}))
    batch = next(pipeline.train_dataset(in_order, _identity, seed=2, global_batch=4, keep_partial=True)
                 .as_numpy_iterator())
    assert batch["mask"].tolist() == [1.0] * 4


def test_train_batches_resume_at_a_step_and_split_between_processes():
    src = _toy(10)
    full = _ids(pipeline.train_dataset(src, _identity, seed=5, global_batch=4), 6)
    resumed = _ids(pipeline.train_dataset(src, _identity, seed=5, global_batch=4, start_step=3), 3)
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["noise"], b["noise"])  # augmentation seeds follow the position
    halves = [_ids(pipeline.train_dataset(src, _identity, seed=5, global_batch=4, process_index=k,
                                          process_count=2), 6) for k in range(2)]
    for step in range(6):  # process k holds positions k, k+2 of each batch, as DistributedSampler's rank k
        for k in range(2):
            for key in ("image", "noise"):
                np.testing.assert_array_equal(halves[k][step][key], full[step][key][k::2])


def _stream_rows(process_rows, global_batch, steps, **kwargs):
    """The stream positions each row of this process's first `steps` batches holds."""
    return [[step * global_batch + int(r) for r in process_rows(global_batch, **kwargs)] for step in range(steps)]


def test_devices_and_processes_take_every_dth_position_so_repeated_copies_are_spread():
    """DeiT's RASampler, written out: indices = [each of randperm(N) 3 times]; rank r of W takes
    indices[r::W], in order. With our stream as `indices`, device d of D (jax.devices() order) must hold
    positions d, d+D, d+2D, ... of each batch; so the 3 copies of an image sit on 3 different devices, and on
    both of 2 processes."""
    global_batch, D = 12, 4
    for processes in (1, 2, 4):
        rows = [_stream_rows(pipeline.process_rows, global_batch, 1, process_index=k, process_count=processes,
                             num_shards=D)[0] for k in range(processes)]
        device_rows = np.concatenate(rows).reshape(D, global_batch // D)  # row order = device order
        for d in range(D):
            assert device_rows[d].tolist() == list(range(d, global_batch, D))  # RASampler's indices[d::D]
    src = _toy(12)
    stream = [int(i) for _, i in pipeline.index_stream(12, seed=3, repeats=3).take(24).as_numpy_iterator()]
    for processes, shards in ((2, 2), (2, 4)):
        per_process = [_ids(pipeline.train_dataset(src, _identity, seed=3, global_batch=12, process_index=k,
                                                    process_count=processes, num_shards=shards, repeats=3), 2)
                       for k in range(processes)]
        for step in range(2):
            placed = {}  # image index -> [(process, device)] of its copies in this batch
            for k in range(processes):
                images = per_process[k][step]["image"][:, 0, 0, 0].astype(int)
                for row, image in enumerate(images):
                    placed.setdefault(int(image), []).append((k, k * (shards // processes) + row // (12 // shards)))
            assert sorted(placed) == sorted(set(stream[12 * step:12 * (step + 1)]))
            for image, where in placed.items():
                copies = stream[12 * step:12 * (step + 1)].count(image)
                assert len(where) == copies
                assert len({device for _, device in where}) == min(copies, shards)  # each copy on its own device
                if copies > 1:
                    assert {process for process, _ in where} == set(range(processes))  # and on both processes


def test_the_devices_of_a_global_batch_hold_what_the_pipeline_placed_there():
    """The pipeline's row order is the device order of `sharding.to_global` (two CPU devices here)."""
    import jax

    from vitdistill.train import sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    src = _toy(12)
    batch = next(pipeline.train_dataset(src, _identity, seed=3, global_batch=12, num_shards=2,
                                        repeats=3).as_numpy_iterator())
    on_devices = sharding.to_global(batch, mesh)["image"]
    stream = [int(i) for _, i in pipeline.index_stream(12, seed=3, repeats=3).take(12).as_numpy_iterator()]
    for shard in on_devices.addressable_shards:
        d = jax.devices().index(shard.device)
        assert np.asarray(shard.data)[:, 0, 0, 0].astype(int).tolist() == stream[d::2]


def test_eval_dataset_counts_every_example_once_over_processes():
    src = _toy(11)
    seen = []
    batches = set()
    for k in range(3):
        ds, n = pipeline.eval_dataset(src, lambda im: {"image": tf.cast(im, tf.float32)}, global_batch=6,
                                      process_index=k, process_count=3)
        batches.add(n)
        for b in ds.as_numpy_iterator():
            seen += [int(v) for v, m in zip(b["image"][:, 0, 0, 0], b["mask"]) if m]
    assert sorted(seen) == list(range(11))
    assert len(batches) == 1  # every process yields the same number of batches


def test_batch_size_errors_name_the_fix():
    with pytest.raises(ConfigError, match="divisible by the 2 devices"):
        pipeline.check_batch_size(3, 2, 100, "x")
    with pytest.raises(ConfigError, match="larger than the 10 examples"):
        pipeline.check_batch_size(16, 2, 10, "x")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = sources.digits("train"), sources.digits("test")
    assert train.num_examples + test.num_examples == 1797
    assert train.num_classes == 10
    labels = [int(test.load(tf.constant(i, tf.int64))["label"]) for i in range(test.num_examples)]
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class of ~180
    image = train.load(tf.constant(0, tf.int64))["image"].numpy()
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and image.max() > 200


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_and_a_clear_error_when_missing(tmp_path):
    images = np.random.RandomState(0).randint(0, 255, (5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    src = sources.fashion_mnist("test", str(tmp_path))
    assert src.num_examples == 5
    first = src.load(tf.constant(1, tf.int64))
    np.testing.assert_array_equal(first["image"].numpy()[..., 0], images[1])
    assert int(first["label"]) == 1
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist("train", str(tmp_path))
    (tmp_path / "bad").mkdir()
    with open(tmp_path / "bad" / "t10k-images-idx3-ubyte", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 5, 28, 28) + b"\x00" * 10)
    _write_idx(tmp_path / "bad" / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    with pytest.raises(DataError, match="truncated"):
        sources.fashion_mnist("test", str(tmp_path / "bad"))


def test_image_folder_reads_classes_and_names_a_corrupt_file(tmp_path):
    for name, colour in (("cat", 10), ("dog", 200)):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            data = tf.io.encode_png(np.full((6, 5, 3), colour + i, np.uint8)).numpy()
            (folder / f"{i}.png").write_bytes(data)
    src = sources.image_folder(str(tmp_path), "train")
    assert src.num_examples == 6 and src.class_names == ["cat", "dog"]
    example = src.load(tf.constant(4, tf.int64))
    assert int(example["label"]) == 1 and example["image"].shape == (6, 5, 3)
    (tmp_path / "train" / "dog" / "9.png").write_bytes(b"not an image at all")
    src = sources.image_folder(str(tmp_path), "train")
    config = ConfigDict({"batch_size": 7, "seed": 0})
    ds = pipeline.train_dataset(src, lambda im, s: {"image": tf.image.resize(im, [4, 4])}, seed=0, global_batch=7)
    with pytest.raises(tf.errors.InvalidArgumentError):
        next(ds.as_numpy_iterator())
    suspects = pipeline.batch_examples(src, 0, config)
    assert str(tmp_path / "train" / "dog" / "9.png") in suspects
    with pytest.raises(DataError, match="does not exist"):
        sources.image_folder(str(tmp_path), "val")
    (tmp_path / "train" / "eel").mkdir()  # a class folder with no images (torchvision's ImageFolder refuses it)
    (tmp_path / "train" / "eel" / "notes.txt").write_text("to do")
    with pytest.raises(DataError, match=r"1 class folder\(s\) of .*train' hold no images .*: eel\. Remove them"):
        sources.image_folder(str(tmp_path), "train")
    assert sources.image_folder(str(tmp_path), "train", class_names=["cat", "dog", "eel"]).num_examples == 7


def test_unknown_source_and_unprepared_tfds_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="valid sources: digits, fashion_mnist, fashion_small, folder, tfds, sample_images"):
        sources.get_source(ConfigDict({"source": "imagenet"}), "train")
    data = ConfigDict({"source": "tfds", "name": "imagenet2012", "data_dir": str(tmp_path), "manual_dir": None})
    with pytest.raises(DataError, match="not prepared") as err:
        sources.get_source(data, "train")
    assert str(tmp_path) in str(err.value) and "manual" in str(err.value)


def test_limited_source_keeps_the_first_examples():
    src = sources.limited(_toy(10), 4)
    assert src.num_examples == 4 and "[:4]" in src.name
    assert sources.limited(_toy(10), None).num_examples == 10


@pytest.mark.skipif(not os.path.exists(sources.FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_when_installed():
    src = sources.fashion_mnist("test")
    assert src.num_examples == 10000 and src.num_classes == 10


def test_jpegs_decode_to_pils_pixels_bit_for_bit(tmp_path):
    """torchvision's ImageFolder decodes with PIL; the folder, TFDS and benchmark sources decode JPEGs with
    the accurate integer IDCT, which gives PIL's pixels exactly (TF's default fast IDCT does not)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    for i, path in enumerate(load_sample_images().filenames):  # china.jpg, flower.jpg: 427 x 640
        (tmp_path / "train" / f"c{i}").mkdir(parents=True)
        shutil.copy(path, tmp_path / "train" / f"c{i}" / "photo.jpg")
    folder = sources.image_folder(str(tmp_path), "train")
    fast_folder = sources.get_source(ConfigDict({"source": "folder", "data_dir": str(tmp_path),
                                                 "jpeg_decoding": "fast"}), "train")
    for i, path in enumerate(load_sample_images().filenames):
        want = np.asarray(Image.open(path).convert("RGB"))
        got = folder.load(tf.constant(i))["image"].numpy()
        np.testing.assert_array_equal(got, want)
        fast = tf.io.decode_jpeg(tf.io.read_file(path), channels=3).numpy()  # TF's default, for contrast
        assert np.abs(fast.astype(int) - want).max() > 0
        np.testing.assert_array_equal(fast_folder.load(tf.constant(i))["image"].numpy(), fast)
    with pytest.raises(DataError, match="jpeg_decoding='pil'.*'accurate'.*'fast'"):
        sources.get_source(ConfigDict({"source": "folder", "data_dir": str(tmp_path), "jpeg_decoding": "pil"}),
                           "train")
    sample = sources.sample_images(num_examples=2)
    np.testing.assert_array_equal(sample.load(tf.constant(0))["image"].numpy(),
                                  np.asarray(Image.open(load_sample_images().filenames[0]).convert("RGB")))


def test_deits_training_stream_from_encoded_images_is_the_stream_from_decoded_ones():
    """DeiT's transform takes a file's bytes and decodes its crop's window alone (`Source.load_encoded`); the
    batches must be those of the decoded images, and the source's decoded `load` must not be called at all."""
    import dataclasses
    import functools

    from vitdistill import recipes
    from vitdistill.methods import deit

    config = recipes.from_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "deit_s.py"))
    config.data.image_size = 32
    config.augment.crop = "resized"  # (at 32 px DeiT's rule pads and crops the whole decoded image instead)
    transform = deit.train_transform(config)
    assert transform.decodes
    source = sources.sample_images(num_examples=12)

    def never(index):
        raise AssertionError("the decoded load was used")

    encoded = pipeline.train_dataset(dataclasses.replace(source, load=never), transform, seed=3, global_batch=6,
                                     start_step=1)
    plain = functools.partial(transform.func, *transform.args, **transform.keywords)  # without `decodes`
    decoded = pipeline.train_dataset(source, plain, seed=3, global_batch=6, start_step=1)
    for got, want in zip(encoded.take(2).as_numpy_iterator(), decoded.take(2).as_numpy_iterator()):
        assert sorted(got) == sorted(want) == ["erase", "image", "label"]
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_sequential_streams_repeated_copies_go_to_different_devices_of_the_process():
    """RASampler gives an image's 3 copies to 3 ranks; a stream read in order (TFRecord) repeats them next to each
    other, and the batch's rows went to the devices in blocks, so the copies stayed on one device (one mixup
    lambda and partner block for all three). Device k now takes every D-th example of the batch, as the
    random-access rows do: the copies are spread, and the batch holds the same examples."""
    ids = np.arange(400, dtype=np.int32)  # more than the shuffle buffer: no second epoch's copy in 4 batches
    images = np.stack([ids // 256, ids % 256, ids % 7], -1).astype(np.uint8)[:, None, None, :]
    source = sources.Source("in_order", 400, 400, sequential=lambda index, count, seed:
                            tf.data.Dataset.from_tensor_slices({"image": images, "label": ids}))

    def identity(image, seed):
        return {"image": image}

    for devices in (1, 2, 3):
        batches = pipeline.train_dataset(source, identity, seed=1, global_batch=12, num_shards=devices, repeats=3)
        spread = 0
        for batch in batches.take(4).as_numpy_iterator():
            labels = batch["label"]
            np.testing.assert_array_equal(batch["image"][:, 0, 0], images[labels, 0, 0])  # rows moved whole
            assert sorted(np.unique(labels, return_counts=True)[1]) == [3] * 4  # 4 images, 3 copies each
            holders = labels.reshape(devices, -1)  # device k's rows
            for label in np.unique(labels):
                on = {k for k in range(devices) if label in holders[k]}
                assert len(on) == min(3, devices), (devices, label, holders)
                spread += len(on) > 1
        assert spread == (0 if devices == 1 else 16)
