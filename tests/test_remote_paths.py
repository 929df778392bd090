"""Remote paths: data, weights metadata, logs, metrics and the config on a filesystem that is not the local one
(TensorFlow's in-memory `ram://`, a stand-in for gs://), with the `os` module made to fail on any such path, so
that a fallback to `os` shows as an error rather than as a local folder named `ram:`.

Orbax writes checkpoint arrays with TensorStore, which has local files and gs:// only: a workdir on another
scheme is refused with a message, before anything is written.
"""
import builtins
import gzip
import json
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

from vitdistill import paths, weights
from vitdistill.data import sources
from vitdistill.errors import CheckpointError, ConfigError, DataError
from vitdistill.train import reporting

gfile = tf.io.gfile


@pytest.fixture
def no_os_for_uris(monkeypatch, tmp_path):
    """os and open() raise on a path with a scheme; the test runs in an empty folder that must stay empty."""
    def guard(fn):
        def guarded(path, *args, **kwargs):
            if "://" in str(path):
                raise AssertionError(f"{fn.__name__}({path!r}) went to the os module")
            return fn(path, *args, **kwargs)
        return guarded

    for module, name in [(os, "listdir"), (os, "makedirs"), (os, "mkdir"), (os.path, "isdir"), (os.path, "exists"),
                         (os.path, "isfile"), (builtins, "open")]:
        monkeypatch.setattr(module, name, guard(getattr(module, name)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir())


def _png(pixels: np.ndarray) -> bytes:
    return tf.io.encode_png(pixels).numpy()


def test_an_image_folder_on_a_remote_filesystem_reads_as_the_same_folder_on_disk(tmp_path, no_os_for_uris):
    rng = np.random.RandomState(0)
    root, local = "ram://folder-data", tmp_path / "local"
    images = {}
    for split, classes in [("train", ("cat", "dog", "eel")), ("val", ("cat", "dog", "eel"))]:
        for c in classes:
            gfile.makedirs(f"{root}/{split}/{c}")
            (local / split / c).mkdir(parents=True)
            for i in range(2 if c != "eel" else 1):
                pixels = rng.randint(0, 256, (5 + i, 7, 3)).astype(np.uint8)
                for base in (root, str(local)):
                    with gfile.GFile(f"{base}/{split}/{c}/{i}.png", "wb") as f:
                        f.write(_png(pixels))
                images[(split, c, i)] = pixels
    with gfile.GFile(f"{root}/train/cat/notes.txt", "w") as f:
        f.write("not an image")
    remote, on_disk = sources.image_folder(root, "train"), sources.image_folder(str(local), "train")
    assert remote.num_examples == on_disk.num_examples == 5
    assert remote.class_names == on_disk.class_names == ["cat", "dog", "eel"]
    for i in range(5):
        a, b = remote.load(tf.constant(i)), on_disk.load(tf.constant(i))
        np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
        assert int(a["label"]) == int(b["label"])
    assert remote.describe(4) == f"{root}/train/eel/0.png"
    np.testing.assert_array_equal(remote.load(tf.constant(4))["image"].numpy(), images[("train", "eel", 0)])
    with pytest.raises(DataError, match="ram://folder-data/test' does not exist"):
        sources.image_folder(root, "test")


def test_idx_files_on_a_remote_filesystem(no_os_for_uris):
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    gfile.makedirs("ram://idx")
    with gfile.GFile("ram://idx/labels-idx1-ubyte.gz", "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + labels.tobytes()))
    np.testing.assert_array_equal(sources.read_idx("ram://idx/labels-idx1-ubyte.gz"), labels)


def test_metrics_config_and_tensorboard_go_to_a_remote_workdir(no_os_for_uris):
    from ml_collections import ConfigDict

    workdir = "ram://run-logs"
    reporter = reporting.Reporter(workdir, total_steps=2, start_step=0, global_batch=4, progress_bar=False)
    reporter.write(1, {"loss": 2.5})
    reporter.write(2, {"loss": 2.0})
    reporter.close()
    reporting.save_config(ConfigDict({"model": {"name": "vit_micro_patch4_32"}, "batch_size": 4}), workdir)
    with gfile.GFile(f"{workdir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0)]
    with gfile.GFile(f"{workdir}/{reporting.CONFIG_FILE}") as f:
        assert json.load(f)["model"]["name"] == "vit_micro_patch4_32"
    assert gfile.listdir(f"{workdir}/tensorboard")


def test_weights_on_a_remote_path_are_looked_up_there_and_errors_name_it(no_os_for_uris):
    gfile.makedirs("ram://weights/empty")
    with gfile.GFile("ram://weights/empty/stray.txt", "w") as f:
        f.write("x")
    with pytest.raises(CheckpointError, match=r"ram://weights/empty is not a vitdistill checkpoint.*stray\.txt"):
        weights.read_metadata("ram://weights/empty")
    with pytest.raises(CheckpointError, match="no checkpoint directory at ram://weights/none"):
        weights.read_metadata("ram://weights/none")
    gfile.makedirs("ram://weights/converted")
    with gfile.GFile("ram://weights/converted/" + weights.METADATA_FILE, "w") as f:
        f.write(json.dumps({"model": "deit_tiny_patch16_224"}))
    assert weights.read_metadata("ram://weights/converted")["model"] == "deit_tiny_patch16_224"
    with pytest.raises(CheckpointError, match="No model checkpoint at 'ram://weights/empty'"):
        weights.read_weights("ram://weights/empty")


def test_checkpoints_where_orbax_cannot_write_are_refused_before_anything_is_written(no_os_for_uris):
    assert paths.check_checkpointable("gs://bucket/run") == "gs://bucket/run"
    with pytest.raises(ConfigError, match="local paths and gs:// only"):
        paths.check_checkpointable("ram://run")
    with pytest.raises(ConfigError, match="weights directory 'ram://zz-refused'"):
        weights.save_variables("ram://zz-refused", {"params": {"w": np.zeros(2)}}, model="x")
    assert not gfile.exists("ram://zz-refused")
