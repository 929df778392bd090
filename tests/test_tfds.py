"""TFDS datasets at ImageNet scale, on a dataset TFDS itself prepares in the test (tests/tiny_tfds.py):
ArrayRecord is read by index through the position-seeded stream (exact resume, one permutation per epoch),
a TFRecord preparation converts to ArrayRecord without Apache Beam, and one left as TFRecord trains with a
warning that names the conversion command."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vitdistill import methods, recipes, small_data
from vitdistill.data import sources, tfds_convert

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_tfds  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{'tfrecord': data_dir, 'converted': data_dir}: TFDS's TFRecord preparation, and a copy converted."""
    root = tmp_path_factory.mktemp("tfds")
    tfrecord = str(root / "tfrecord")
    version_dir = tiny_tfds.build(tfrecord, "tfrecord")
    converted = str(root / "converted")
    shutil.copytree(tfrecord, converted)
    counts = tfds_convert.convert(version_dir.replace(tfrecord, converted))
    assert sorted(counts.values()) == [20, 60]
    return {"tfrecord": tfrecord, "converted": converted}


def _in_order(data_dir, split):
    """TFDS's own reader, files in order: the reference for what record `i` is."""
    builder = tfds.builder(tiny_tfds.NAME, data_dir=data_dir)
    return list(tfds.as_numpy(builder.as_dataset(split, shuffle_files=False)))


def test_array_record_is_read_by_index_exactly_as_tfds_reads_it_in_order(prepared, monkeypatch):
    src = sources.tfds_source(tiny_tfds.NAME, "train", prepared["converted"])
    assert src.random_access and src.num_examples == 60 and src.num_classes == 10 and not src.note
    reference = _in_order(prepared["tfrecord"], "train")
    for i in (0, 7, 59):
        example = src.load(tf.constant(i, tf.int64))
        np.testing.assert_array_equal(example["image"].numpy(), reference[i]["image"])
        assert int(example["label"]) == reference[i]["label"]
    labels = [int(src.load(tf.constant(i, tf.int64))["label"]) for i in range(60)]
    assert labels == [int(r["label"]) for r in reference]
    # Left as TFRecord and too large for memory: read in order, with the way out in its note.
    monkeypatch.setattr(sources, "IN_MEMORY_LIMIT_BYTES", 0)
    sequential = sources.tfds_source(tiny_tfds.NAME, "train", prepared["tfrecord"])
    assert not sequential.random_access
    assert "approximate resume" in sequential.note and "vitdistill.data.tfds_convert" in sequential.note


def test_conversion_is_resumable_and_refuses_what_is_not_a_dataset(prepared, tmp_path):
    from vitdistill.errors import DataError

    copy = tmp_path / "copy"
    shutil.copytree(prepared["tfrecord"], copy)
    version_dir = str(copy / tiny_tfds.NAME / "1.0.0")
    assert tfds_convert.main(["tfds_convert", version_dir]) == 0
    train = os.path.join(version_dir, f"{tiny_tfds.NAME}-train.array_record-00000-of-00001")
    os.remove(os.path.join(version_dir, f"{tiny_tfds.NAME}-test.array_record-00000-of-00001"))  # "interrupted"
    modified = os.stat(train).st_mtime_ns
    assert sorted(tfds_convert.convert(version_dir).values()) == [20, 60]
    assert os.stat(train).st_mtime_ns == modified  # the finished shard was kept, not rewritten
    with pytest.raises(DataError, match="holds no dataset_info.json"):
        tfds_convert.convert(str(tmp_path))


def _deit_on(data_dir, steps):
    config = recipes.deit("deit_micro_patch4_32")
    small_data.runlocal(config)
    config.data.source = "tfds"
    config.data.name = tiny_tfds.NAME
    config.data.data_dir = data_dir
    config.data.eval_split = "test"
    config.data.image_size = 16
    config.data.eval_limit = 8
    config.augment.rand_augment = False
    config.augment.repeats = 3  # DeiT's repeated augmentation, spread over the two devices
    config.mixup.mixup_alpha = 0.8
    config.mixup.cutmix_alpha = 1.0
    config.distill.kind = "none"
    config.batch_size = 8
    config.epochs = 1.0  # 60 examples / 8: 7 steps
    config.max_steps = steps
    config.checkpoint_every_steps = 100
    return config


def _raw(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        return manager.latest_step(), manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())


def test_a_run_on_array_record_cut_and_resumed_ends_as_the_uninterrupted_one(prepared, tmp_path, capsys):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    methods.train_and_evaluate(_deit_on(prepared["converted"], 5), whole)  # crosses no epoch; 5 of 7 steps
    methods.train_and_evaluate(_deit_on(prepared["converted"], 2), cut)
    methods.train_and_evaluate(_deit_on(prepared["converted"], 5), cut)
    (step_a, a), (step_b, b) = _raw(whole), _raw(cut)
    assert step_a == step_b == 5
    for key in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, a[key], b[key])
    assert "warning" not in capsys.readouterr().out


def test_two_processes_each_hold_one_copy_of_an_image_as_rasampler_ranks_do(prepared, tmp_path):
    """RASampler (DeiT's samplers.py) on 2 ranks: indices = each of randperm(N) 3 times in a row, rank r takes
    indices[r::2]. Two processes reading the ArrayRecord dataset must hold exactly that, and the global batch
    assembled on the devices must be rank 0's rows then rank 1's."""
    import socket
    import subprocess

    from vitdistill.data import pipeline

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "two_process_rows.py")
    procs = [subprocess.Popen([sys.executable, script, str(port), str(k), prepared["converted"],
                               str(tmp_path / f"{k}.json")], stderr=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    got = [json.load(open(tmp_path / f"{k}.json")) for k in range(2)]
    stream = [int(i) for _, i in pipeline.index_stream(60, seed=3, repeats=3).take(48).as_numpy_iterator()]
    spread = 0
    for step in range(4):
        indices = stream[12 * step:12 * (step + 1)]  # RASampler's `indices` for this batch
        for k in range(2):
            assert got[k]["local"][step] == indices[k::2]
            assert got[k]["global"][step] == indices[0::2] + indices[1::2]
        for image in set(indices):
            holders = {k for k in range(2) if image in got[k]["local"][step]}
            if indices.count(image) > 1:
                assert holders == {0, 1}
                spread += 1
    assert spread >= 12  # most of the 16 distinct images of 4 batches have their copies on both processes


@pytest.mark.parametrize("repeats", [1, 3])
def test_a_tfrecord_stream_shuffles_encoded_images_and_gives_the_batches_of_decoded_ones(prepared, monkeypatch,
                                                                                          repeats):
    """Left as TFRecord, a dataset is read in order and shuffled in a buffer of 16 batches: of encoded images
    now (`Source.sequential_encoded`; decoded ones took five times the memory or more), decoded after it, by
    DeiT's transform for its crop alone or before the repeated copies once. The batches must be those of the
    decoded stream, for DeiT's transform and for one that takes decoded images."""
    import dataclasses
    import functools

    from vitdistill.data import pipeline
    from vitdistill.methods import deit

    monkeypatch.setattr(sources, "IN_MEMORY_LIMIT_BYTES", 0)
    source = sources.tfds_source(tiny_tfds.NAME, "train", prepared["tfrecord"])
    assert not source.random_access and source.sequential_encoded is not None
    decoded_only = dataclasses.replace(source, sequential_encoded=None)  # the stream as it was: decode, then shuffle
    config = _deit_on(prepared["tfrecord"], 2)
    transform = deit.train_transform(config)
    plain = functools.partial(transform.func, *transform.args, **transform.keywords)  # takes decoded images only
    for fn in (transform, plain):
        kwargs = dict(seed=4, global_batch=8, start_step=2, repeats=repeats)
        got = pipeline.train_dataset(source, fn, **kwargs).take(3)
        want = pipeline.train_dataset(decoded_only, fn, **kwargs).take(3)
        for a, b in zip(got.as_numpy_iterator(), want.as_numpy_iterator()):
            assert sorted(a) == sorted(b)
            for key in b:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_bench_leaves_a_tfrecord_evaluation_split_whole_and_cuts_an_array_record_one(prepared, tmp_path):
    """`bench --data=config` cut the evaluation split to one batch, which a dataset read in order refuses: the
    pipeline benchmark stopped on any TFRecord dataset before timing anything."""
    from vitdistill import bench

    for data_dir, cut in ((prepared["tfrecord"], None), (prepared["converted"], 8)):
        config = bench.bench_config(_deit_on(data_dir, 2), data="config")
        assert config.data.eval_limit == cut
        task = methods.get("deit").build_task(config, str(tmp_path))  # as bench builds it: no DataError
        assert task.data.source.random_access == (cut is not None)
