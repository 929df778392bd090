"""A damaged checkpoint (a data file cut short, an empty metadata file, a converted folder without its arrays)
ends in one CheckpointError that names the step and the way back, not in orbax's or tensorstore's traceback;
following the way back it names resumes from the step before."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitdistill import weights
from vitdistill.errors import CheckpointError
from vitdistill.train.state_checkpoints import StateCheckpoints


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((64, 256), value, jnp.float32), "b": jnp.arange(5, dtype=jnp.float32) + value},
            "step": jnp.asarray(int(value), jnp.int32)}


def _saved(workdir) -> StateCheckpoints:
    checkpoints = StateCheckpoints(str(workdir), every_steps=1, keep=3, async_save=False)
    for step in (1, 2):
        checkpoints.maybe_save(step, _state(float(step)))
    checkpoints.close()
    return StateCheckpoints(str(workdir), every_steps=1, keep=3, async_save=False)


def _abstract():
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0.0))


def _largest_file(directory) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def test_a_data_file_cut_short_names_the_step_and_resumes_from_the_one_before_once_deleted(tmp_path):
    checkpoints = _saved(tmp_path)
    np.testing.assert_array_equal(checkpoints.restore(_abstract())["params"]["w"], 2.0)
    victim = _largest_file(tmp_path / "checkpoints" / "2")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(CheckpointError, match=r"Cannot read the checkpoint of step 2 in \S+/checkpoints \(.+\)\. If it "
                                              r"is damaged or incomplete .*, delete \S+/checkpoints/2 to resume from "
                                              r"step 1") as caught:
        checkpoints.restore(_abstract())
    assert "\n" not in str(caught.value)
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    again = StateCheckpoints(str(tmp_path), every_steps=1, keep=3, async_save=False)
    assert again.latest_step() == 1
    np.testing.assert_array_equal(again.restore(_abstract())["params"]["w"], 1.0)


def test_an_empty_metadata_file_is_named_before_anything_is_restored(tmp_path):
    checkpoints = _saved(tmp_path)
    metadata = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "checkpoints" / "2")
                for name in names if name == "_METADATA"]
    assert metadata
    for path in metadata:
        open(path, "w").close()
    with pytest.raises(CheckpointError, match=r"Cannot read the checkpoint of step 2 .* to resume from step 1"):
        checkpoints.check_fits(_abstract())


def test_a_converted_folder_without_its_arrays_is_one_error_naming_the_folder(tmp_path):
    variables = {"params": {"w": np.ones((3, 4), np.float32)}}
    weights.save_variables(str(tmp_path / "conv"), variables, model="deit_micro_patch4_32")
    np.testing.assert_array_equal(weights.load_variables(str(tmp_path / "conv"))["params"]["w"], 1.0)
    import shutil
    shutil.rmtree(tmp_path / "conv" / weights.VARIABLES_DIR)
    with pytest.raises(CheckpointError, match=r"Cannot read the weights in \S+/conv \(.+\): the folder is damaged or "
                                              r"incomplete"):
        weights.load_variables(str(tmp_path / "conv"))


def test_a_workdir_that_is_a_file_is_named_as_such(tmp_path):
    from vitdistill.errors import ConfigError
    from vitdistill.train.state_checkpoints import check_writable

    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"--workdir=\S+/afile is a file, not a directory: give --workdir a "
                                          r"directory"):
        check_writable(str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=r"\S+/afile is a file, not a directory, and this run's folder \S+/afile/teacher "
                                          r"would be inside it: give --workdir a directory"):
        check_writable(str(tmp_path / "afile" / "teacher"))


def test_a_workdirs_config_json_cut_short_leaves_its_weights_readable_and_is_written_whole(tmp_path):
    """A config.json cut short (a run killed while writing it, before save_config wrote a temporary file and
    renamed it) made reading the workdir's weights (k-NN, init_from, a teacher, visualize) a JSONDecodeError
    traceback; the model name is then unknown, as for a workdir without one, and the callers ask for it."""
    from ml_collections import ConfigDict

    from vitdistill.train import reporting

    _saved(tmp_path).close()
    reporting.save_config(ConfigDict({"model": {"name": "vit_micro_patch4_32"}, "batch_size": 4}), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]  # no temporary file left
    loaded = weights.read_weights(str(tmp_path), "student")
    assert loaded.model == "vit_micro_patch4_32"
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(text[: len(text) // 2])
    loaded = weights.read_weights(str(tmp_path), "student")
    assert loaded.model is None
    np.testing.assert_array_equal(loaded.variables["params"]["w"], 2.0)
