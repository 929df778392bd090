"""Every run is checked before any compute: a bad setting of the student (or of its teacher) is one message
that names the value and the fix, raised before the teacher trains and before the workdir is touched."""
import os

import pytest

import legacy_workdirs
from test_cli import _main
from vitdistill import methods, models
from vitdistill.errors import ConfigError
from vitdistill.train import loop


@pytest.fixture(autouse=True)
def nano_models(monkeypatch):
    for name, entry in legacy_workdirs.NANO_MODELS.items():
        monkeypatch.setitem(models.MODELS, name, entry)


def _deit(**overrides):
    return legacy_workdirs.with_overrides(legacy_workdirs.deit_config(max_steps=3), overrides)


def _dino(**overrides):
    return legacy_workdirs.with_overrides(legacy_workdirs.dino_config(max_steps=3), overrides)


CASES = {
    "batch 0": (_deit, {"batch_size": 0}, "config.batch_size=0: it must be a positive number"),
    "batch -4": (_deit, {"batch_size": -4}, "config.batch_size=-4: it must be a positive number"),
    "batch odd over the 2 devices": (_deit, {"batch_size": 7}, "batch_size=7 is not divisible by the 2 devices"),
    "odd mixup group": (_deit, {"batch_size": 6}, "splits into 2 mixup groups .* divisible by 4"),
    "batch above the data": (_deit, {"batch_size": 2000}, "batch_size 2000 is larger than the 1438 examples"),
    "head narrower than the labels": (_deit, {"model.num_classes": 5},
                                      "num_classes=5 is smaller than the 10 classes of digits:train"),
    "teacher's batch": (_deit, {"teacher.train.batch_size": 0}, "config.batch_size=0"),
    "local crop above the global": (_dino, {"multicrop.local_size": 24}, "local_size=24 is larger than global_size=16"),
    "global crop off the patch grid": (_dino, {"multicrop.global_size": 18},
                                       "global_size=18 is not a whole number of .* 4-pixel patches; use a multiple "
                                       "of 4, e.g. --config.multicrop.global_size=16"),
    "local crop off the patch grid": (_dino, {"multicrop.local_size": 6}, "local_size=6 is not a whole number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_setting_is_named_before_any_run_starts(case, tmp_path, monkeypatch):
    make, overrides, message = CASES[case]
    config = make(**overrides)
    started = []
    monkeypatch.setattr(loop, "run", lambda task, config, workdir: started.append(workdir))
    workdir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        methods.train_and_evaluate(config, workdir)
    assert started == [] and not os.path.exists(workdir)


def test_the_plan_runs_the_teacher_first_and_good_settings_pass(tmp_path, monkeypatch):
    # the checks above stop a DeiT run whose teacher would otherwise have trained first
    config = _deit()
    workdir = str(tmp_path / "run")
    assert [w for _, w in methods.planned_runs(config, workdir)] == [os.path.join(workdir, "teacher"), workdir]
    started = []
    monkeypatch.setattr(methods.deit, "build_task", lambda config, workdir: config.model.name)
    monkeypatch.setattr(loop, "run", lambda task, config, workdir: started.append(workdir) or {})
    methods.train_and_evaluate(config, workdir)
    assert started == [os.path.join(workdir, "teacher"), workdir]
    methods.check(_dino())


def test_a_missing_config_file_and_a_mistyped_value_are_one_line_each(tmp_path):
    missing = _main("--config=configs/deit_small.py", f"--workdir={tmp_path}", timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "No config file 'configs/deit_small.py'" in missing.stderr and "deit_s.py" in missing.stderr
    typed = _main("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.batch_size=abc", timeout=120)
    assert typed.returncode == 2 and "Traceback" not in typed.stderr
    assert typed.stderr.strip().count("\n") == 0, typed.stderr
    assert "--config.batch_size=abc" in typed.stderr and "invalid literal for int()" in typed.stderr
    assert not os.listdir(tmp_path)


def test_a_student_checkpoint_directory_that_cannot_be_written_stops_the_plan_before_the_teacher_trains(
        tmp_path, monkeypatch):
    import tensorflow as tf

    from vitdistill.errors import CheckpointSaveError

    workdir = str(tmp_path / "run")
    real = tf.io.gfile.GFile

    def student_read_only(path, mode="r"):  # the teacher's workdir/teacher/checkpoints stays writable
        if "w" in mode and os.path.dirname(path) == os.path.join(workdir, "checkpoints"):
            raise tf.errors.PermissionDeniedError(None, None, f"{path}; Read-only file system")
        return real(path, mode)

    started = []
    monkeypatch.setattr(tf.io.gfile, "GFile", student_read_only)
    monkeypatch.setattr(loop, "run", lambda task, config, workdir: started.append(workdir) or {})
    with pytest.raises(CheckpointSaveError, match=r"Cannot write checkpoints to .*run/checkpoints: .*Read-only file "
                                                  r"system\. Nothing was trained"):
        methods.train_and_evaluate(_deit(), workdir)
    assert started == [] and os.listdir(os.path.join(workdir, "teacher", "checkpoints")) == []
