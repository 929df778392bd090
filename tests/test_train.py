"""End to end on tiny models and scikit-learn's digits: one step per distillation kind, DINO steps,
resumption that reproduces an uninterrupted run bit for bit, and the errors a user meets."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vitdistill import methods, models, recipes, small_data
from vitdistill.errors import BadImageError, CheckpointError, ConfigError, NonFiniteLossError


def _deit_config(kind="hard", steps=2):
    config = recipes.deit("deit_micro_distilled_patch4_32", distilled=True)
    small_data.runlocal(config)
    config.data.image_size = 16  # 16 tokens: compiles and runs fast
    config.model.name = "deit_micro_distilled_patch4_32" if kind != "none" else "deit_micro_patch4_32"
    config.distill.kind = kind
    config.max_steps = steps
    config.batch_size = 8
    config.mixup.mixup_alpha = 0.8
    config.mixup.cutmix_alpha = 1.0
    config.teacher.train.data.image_size = 16
    config.teacher.train.batch_size = 8
    config.teacher.train.max_steps = 2
    config.data.eval_limit = 16
    config.teacher.train.data.eval_limit = 16
    config.augment.rand_augment = False  # tested on its own; its tf.data graph takes seconds to build
    return config


def _restore_raw(workdir, step=None):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        step = manager.latest_step() if step is None else step
        return step, manager.restore(step, args=ocp.args.StandardRestore())


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
def test_one_deit_step_per_distillation_kind(tmp_path, kind):
    config = _deit_config(kind, steps=1)
    final = methods.train_and_evaluate(config, str(tmp_path))
    step, saved = _restore_raw(str(tmp_path))
    assert step == 1 and final["step"] == 1
    train_rows = [m for m in _metrics(str(tmp_path)) if m["split"] == "train"]
    assert np.isfinite(train_rows[-1]["loss"]) and train_rows[-1]["grad_norm"] > 0
    if kind == "none":
        assert "top1" in final and "top1_dist" not in final
        assert not os.path.exists(tmp_path / "teacher")
    else:
        assert {"top1", "top1_cls", "top1_dist"} <= set(final)
        assert train_rows[-1]["loss_distillation"] > 0
        assert os.path.exists(tmp_path / "teacher" / "checkpoints")  # the teacher was trained first
        assert not saved.get("teacher_params")  # and is not in the student's checkpoint
        teacher_shapes = {np.shape(x) for x in jax.tree.leaves(_restore_raw(str(tmp_path / "teacher"))[1]["params"])}
        student_shapes = {np.shape(x) for x in jax.tree.leaves(saved)}
        assert (3, 3, 3, 32) in teacher_shapes and (3, 3, 3, 32) not in student_shapes
    assert 0 <= final["top1"] <= 1 and final["count"] == 16


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    config = _deit_config("hard", steps=4)
    config.checkpoint_every_steps = 100
    methods.train_and_evaluate(config, whole)
    config.max_steps = 2
    methods.train_and_evaluate(config, halves)  # "stops" at step 2 with a checkpoint
    config.max_steps = 4
    methods.train_and_evaluate(config, halves)  # the same command again: resumes at 2
    (step_a, a), (step_b, b) = _restore_raw(whole), _restore_raw(halves)
    assert step_a == step_b == 4
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])


def _dino_config(steps=2):
    config = recipes.dino("vit_micro_patch4_32")
    small_data.runlocal(config)
    config.max_steps = steps
    config.batch_size = 8
    config.multicrop.global_size = 16
    config.multicrop.local_size = 8
    config.knn.train_limit = 64
    config.knn.eval_limit = 32
    return config


def test_dino_resume_reproduces_student_teacher_and_center(tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    config = _dino_config(steps=4)
    config.checkpoint_every_steps = 100
    final = methods.train_and_evaluate(config, whole)
    assert 0 <= final["knn_top1"] <= 1
    config.max_steps = 2
    methods.train_and_evaluate(config, halves)
    config.max_steps = 4
    methods.train_and_evaluate(config, halves)
    (_, a), (_, b) = _restore_raw(whole), _restore_raw(halves)
    for key in ("params", "teacher_params", "center", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, a[key], b[key])
    # The teacher moved towards the student, and is not the student.
    diff = jax.tree.map(lambda s, t: float(np.abs(s - t).max()), a["params"], a["teacher_params"])
    assert max(jax.tree.leaves(diff)) > 0
    rows = [m for m in _metrics(whole) if m["split"] == "train"]
    assert {"teacher_entropy", "teacher_student_kl", "teacher_momentum", "weight_decay"} <= set(rows[-1])


def test_bad_distillation_kind_and_a_missing_teacher_are_named(tmp_path):
    config = _deit_config("hard")
    config.distill.kind = "medium"
    with pytest.raises(ConfigError, match="valid kinds: none, soft, hard"):
        methods.train_and_evaluate(config, str(tmp_path / "a"))
    config = _deit_config("hard")
    config.teacher.train = config.teacher.train.__class__()
    config.teacher.checkpoint = None
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        methods.train_and_evaluate(config, str(tmp_path / "b"))
    config.teacher.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="No model checkpoint"):
        methods.train_and_evaluate(config, str(tmp_path / "c"))
    config = _deit_config("hard")
    config.model.name = "deit_micro_patch4_32"
    with pytest.raises(ConfigError, match="needs a distilled student"):
        methods.train_and_evaluate(config, str(tmp_path / "d"))


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing_bad(tmp_path):
    config = _deit_config("none", steps=3)
    config.optim.lr = float("nan")
    config.log_every_steps = 1
    with pytest.raises(NonFiniteLossError, match="Loss is nan at step 2") as err:
        methods.train_and_evaluate(config, str(tmp_path))
    assert "no checkpoint was saved yet" in str(err.value) and "--config.optim.lr" in str(err.value)
    assert not os.listdir(tmp_path / "checkpoints")


def test_an_update_that_makes_the_weights_non_finite_is_never_saved(tmp_path):
    """The loss of a step is computed before its update: with lr 1e39 (inf in float32) the loss is finite
    but the weights after it are not. With a checkpoint every step, nothing non-finite may reach disk and
    the last good checkpoint must stay as it was."""
    config = _deit_config("none", steps=2)
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    methods.train_and_evaluate(config, str(tmp_path))
    _, good = _restore_raw(str(tmp_path), 2)
    config.max_steps = 4
    config.optim.lr = config.optim.warmup_lr = 1e39  # step 3 is in epoch 0's warm-up (per-epoch schedule)
    with pytest.raises(NonFiniteLossError, match=r"update at step 3 left \d+ non-finite arrays in the state") as err:
        methods.train_and_evaluate(config, str(tmp_path))
    assert "the last good checkpoint is step 2" in str(err.value) and "params" in str(err.value)
    with ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints")) as manager:
        assert max(manager.all_steps()) == 2
        for step in manager.all_steps():
            saved = manager.restore(step, args=ocp.args.StandardRestore())
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved)
                       if np.issubdtype(np.asarray(x).dtype, np.inexact)), step
    _, still = _restore_raw(str(tmp_path), 2)
    jax.tree.map(np.testing.assert_array_equal, still, good)


def _poison(monkeypatch, bad_steps):
    """DeiT's step made to return a NaN loss and NaN weights when the state's step is in `bad_steps`."""
    import jax.numpy as jnp

    from vitdistill.methods import deit

    original = deit.train_step

    def poisoned(state, batch, frozen, *, setup):
        new_state, metrics = original(state, batch, frozen, setup=setup)
        bad = jnp.isin(state.step, jnp.asarray(bad_steps))
        nan = jnp.where(bad, jnp.nan, 1.0)
        return (new_state.replace(params=jax.tree.map(lambda p: p * nan, new_state.params)),
                {**metrics, "loss": metrics["loss"] * nan})

    monkeypatch.setattr(deit, "train_step", poisoned)


def test_a_skipped_step_moves_the_schedules_on_but_not_adams_moments():
    """The official loops index lr and decay by iteration: after a skipped update, step s still trains at
    lr(s). Adam's per-parameter counts (bias correction) stay, as when GradScaler skips optimizer.step()."""
    import jax.numpy as jnp
    import optax

    from vitdistill.train import loop, optim
    from vitdistill.train.state import TrainState

    def lr(count):
        return 0.1 * (count + 1.0)  # step s: 0.1 (s + 1)

    tx = optim.adamw(lr, weight_decay=0.0, decay_mask=lambda p: jax.tree.map(lambda _: False, p))
    params = {"w": jnp.zeros(3)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def train_step(state, batch, frozen):
        updates, opt_state = tx.update({"w": jnp.ones(3)}, state.opt_state, state.params)
        loss = jnp.where(state.step == 1, jnp.nan, 1.0)  # step 1's update is thrown away
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), {"loss": loss}

    step, counters, w = jax.jit(loop.skipping_nonfinite(train_step)), loop.skip_counters(), []
    for _ in range(4):
        state, metrics, counters = step(state, None, None, counters)
        w.append(float(state.params["w"][0]))
    # a constant gradient of 1: each applied Adam update is -lr (m^ = v^ = 1; eps 1e-8 aside)
    np.testing.assert_allclose(w, [-0.1, -0.1, -0.1 - 0.3, -0.1 - 0.3 - 0.4], rtol=1e-6)
    assert int(state.step) == 4 and int(state.opt_state.count) == 4 and int(state.opt_state.leaf_steps["w"]) == 3
    assert int(counters["total"]) == 1


def test_skipping_non_finite_steps_keeps_the_state_counts_them_and_stops_after_n_in_a_row(tmp_path, monkeypatch,
                                                                                          capsys):
    config = _deit_config("none", steps=5)
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 10
    config.log_every_steps = 1
    config.skip_nonfinite_steps = 2
    _poison(monkeypatch, [1, 3])  # the 2nd and 4th updates
    result = methods.train_and_evaluate(config, str(tmp_path / "skips"))
    assert result["step"] == 5
    out = capsys.readouterr()
    said = out.out + out.err
    assert "step 2: non-finite loss or update, skipped (1 in a row, 1 in all" in said, said
    assert "step 4: non-finite loss or update, skipped (1 in a row, 2 in all" in said, said
    saved = {step: _restore_raw(str(tmp_path / "skips"), step)[1]["params"] for step in range(1, 6)}
    for step, params in saved.items():
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), step
    jax.tree.map(np.testing.assert_array_equal, saved[2], saved[1])  # the skipped update left the weights alone
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved[3]), jax.tree.leaves(saved[2])))
    rows = [m for m in _metrics(str(tmp_path / "skips")) if m["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 3, 5] and rows[-1]["skipped_total"] == 2  # no NaN written

    config.skip_nonfinite_steps = 3
    _poison(monkeypatch, list(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row had a non-finite loss or update and were "
                                                 r"skipped .*skip_nonfinite_steps=3; 3 skipped in all, seen at step 4"
                       ) as err:
        methods.train_and_evaluate(config, str(tmp_path / "stops"))
    assert "the last good checkpoint is step 3" in str(err.value)  # steps 2-4 skipped: step 3 holds step 1's weights
    jax.tree.map(np.testing.assert_array_equal, _restore_raw(str(tmp_path / "stops"), 3)[1]["params"],
                 _restore_raw(str(tmp_path / "stops"), 1)[1]["params"])
    config.skip_nonfinite_steps = -1
    with pytest.raises(ConfigError, match="skip_nonfinite_steps=-1"):
        methods.train_and_evaluate(config, str(tmp_path / "negative"))


def test_eval_only_run_of_a_saved_model_reproduces_its_accuracy(tmp_path):
    from vitdistill import weights

    teacher = small_data.cnn_teacher("digits", epochs=1)
    teacher.data.image_size = 16
    teacher.batch_size = 8
    teacher.max_steps = 3
    teacher.data.eval_limit = 40
    teacher.progress_bar = False
    trained = methods.train_and_evaluate(teacher, str(tmp_path / "teacher"))
    variables, name = weights.read_variables(str(tmp_path / "teacher"))
    assert name == "resnet_micro" and "batch_stats" in variables
    weights.save_variables(str(tmp_path / "exported"), variables, model=name)

    evaluate = small_data.cnn_teacher("digits", epochs=1)
    evaluate.data.image_size = 16
    evaluate.batch_size = 8
    evaluate.epochs = 0.0  # no training: evaluate the loaded weights
    evaluate.data.eval_limit = 40
    evaluate.model.init_from = str(tmp_path / "exported")
    evaluate.progress_bar = False
    again = methods.train_and_evaluate(evaluate, str(tmp_path / "eval"))
    assert again["step"] == 0
    assert again["top1"] == trained["top1"] and again["count"] == 40


def test_a_corrupt_image_stops_training_naming_the_file(tmp_path):
    import tensorflow as tf

    for label, name in enumerate(("cat", "dog")):
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(np.full((20, 20, 3), 50 + 100 * label, np.uint8)).numpy())
    (tmp_path / "data" / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    config = _deit_config("none", steps=2)
    config.data.source = "folder"
    config.data.data_dir = str(tmp_path / "data")
    config.data.eval_split = "train"
    config.data.eval_limit = None
    config.batch_size = 8  # 9 images: the first batch holds the broken one or the next does
    with pytest.raises(BadImageError, match=r"broken\.jpg") as err:
        methods.train_and_evaluate(config, str(tmp_path / "run"))
    assert "Remove or replace" in str(err.value)
    config.epochs = 0.0  # evaluation alone (of given weights) meets it too, and names it as well
    from vitdistill import weights
    initial = models.create(config.model.name, img_size=16).init(jax.random.key(0), np.zeros((1, 16, 16, 3)))
    weights.save_variables(str(tmp_path / "initial"), {"params": initial["params"]}, model=config.model.name)
    config.model.init_from = str(tmp_path / "initial")
    with pytest.raises(BadImageError, match=r"broken\.jpg"):
        methods.train_and_evaluate(config, str(tmp_path / "eval"))


def test_evaluating_without_weights_is_refused_naming_init_from(tmp_path):
    """epochs=0 trains nothing: without init_from or a checkpoint in the workdir, the run would score the random
    initialisation (chance) and exit 0; it stops before any compute instead."""
    config = _deit_config("none", steps=2)
    config.epochs = 0.0
    with pytest.raises(ConfigError, match=r"Nothing to evaluate: config.epochs=0.0 trains nothing.*"
                                          r"--config.model.init_from=DIR"):
        methods.train_and_evaluate(config, str(tmp_path / "eval"))


def test_a_scan_lists_every_bad_image_at_once_and_skipping_trains_without_them(tmp_path, capsys):
    import tensorflow as tf

    from vitdistill.errors import DataError

    for label, name in enumerate(("cat", "dog")):
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(np.full((20, 20, 3), 50 + 100 * label, np.uint8)).numpy())
    jpeg = tf.io.encode_jpeg(np.random.RandomState(0).randint(0, 255, (20, 20, 3)).astype(np.uint8)).numpy()
    bad = {"cat/half.jpg": jpeg[:len(jpeg) // 2],              # a download cut short
           "dog/empty.jpg": b"",                               # a zero-byte file
           "dog/text.png": b"<html>404 Not Found</html>"}      # not an image at all
    for name, data in bad.items():
        (tmp_path / "data" / "train" / name).write_bytes(data)
    config = _deit_config("none", steps=2)
    config.data.source = "folder"
    config.data.data_dir = str(tmp_path / "data")
    config.data.eval_split = "train"
    config.data.eval_limit = None
    config.batch_size = 4
    config.data.scan_images = True
    with pytest.raises(DataError) as err:  # all three in one message, before anything is built or trained
        methods.train_and_evaluate(config, str(tmp_path / "scanned"))
    message = str(err.value)
    assert "3 of the 11 images" in message and "skip_bad_images=True" in message, message
    for name in bad:
        assert str(tmp_path / "data" / "train" / name) in message, (name, message)
    assert not os.path.exists(tmp_path / "scanned")

    config.data.scan_images = False
    config.data.skip_bad_images = True
    capsys.readouterr()
    result = methods.train_and_evaluate(config, str(tmp_path / "skipped"))
    assert result["step"] == 2 and result["count"] == 8  # the 8 good images, evaluated
    out = capsys.readouterr()
    assert "3 of the 11 images" in out.out + out.err and "left out" in out.out + out.err
    listed = (tmp_path / "skipped" / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(str(tmp_path / "data" / "train" / n) for n in bad)
    assert "skipped_images.txt" in out.out  # named again once the run ends

    digits = _deit_config("none", steps=2)
    digits.data.skip_bad_images = True
    with pytest.raises(DataError, match="applies to image folders"):
        methods.train_and_evaluate(digits, str(tmp_path / "digits"))


def test_a_given_teacher_checkpoint_is_used_instead_of_training_one(tmp_path):
    from vitdistill.methods import deit, teacher

    config = _deit_config("hard")
    config.teacher.checkpoint = "random"  # with a teacher.train block still in the config
    assert deit.prerequisites(config, str(tmp_path)) == []  # no teacher run before the student's
    name, _, variables = teacher.load_teacher(config, str(tmp_path), num_classes=10)
    assert name == config.teacher.train.model.name and variables is not None
    assert not os.path.exists(os.path.join(tmp_path, "teacher"))  # nothing was trained


def test_a_workdir_refuses_another_runs_config_before_writing_anything(tmp_path):
    """A DeiT workdir resumed with a DINO config, with another model, or with a config whose state has other
    shapes: each one message naming what differs, and config.json and the checkpoints untouched."""
    from vitdistill.errors import UserError

    config = _deit_config("none", steps=2)
    methods.train_and_evaluate(config, str(tmp_path))
    config_file = tmp_path / "config.json"
    before = (config_file.read_bytes(), sorted(os.listdir(tmp_path / "checkpoints")))

    dino = recipes.dino("vit_micro_patch4_32")
    small_data.use_small_data(dino, "digits")
    with pytest.raises(ConfigError, match=r"holds another run \(method 'deit' there, 'dino' here; model "
                                          r"'deit_micro_patch4_32' there, 'vit_micro_patch4_32' here"):
        methods.train_and_evaluate(dino, str(tmp_path))
    other_model = _deit_config("hard", steps=4)  # the distilled micro DeiT
    other_model.distill.kind = "none"
    with pytest.raises(ConfigError, match="model 'deit_micro_patch4_32' there, 'deit_micro_distilled_patch4_32' here"):
        methods.train_and_evaluate(other_model, str(tmp_path))
    other_shapes = _deit_config("none", steps=4)
    other_shapes.data.image_size = 32  # a 64-patch position embedding where the checkpoint has 16
    with pytest.raises(CheckpointError, match=r"does not fit this config's model and optimiser: .*pos_embed: saved "
                                              r"\(1, 17, 128\), this config \(1, 65, 128\)"):
        methods.train_and_evaluate(other_shapes, str(tmp_path))
    assert (config_file.read_bytes(), sorted(os.listdir(tmp_path / "checkpoints"))) == before
    assert issubclass(CheckpointError, UserError)


@pytest.mark.parametrize("when", ["during the write", "when saving"])
def test_a_failed_save_stops_the_run_at_once_naming_the_cause_and_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                          when):
    """A full disk (the error orbax's writer raises for ENOSPC) at step 3's checkpoint: the run stops with one
    CheckpointSaveError, trains at most one step past the failed save, and step 2's checkpoint stays intact.
    "during the write": the asynchronous write fails in the background (seen at the next step boundary);
    "when saving": the save call itself fails."""
    from vitdistill.errors import CheckpointSaveError
    from vitdistill.train import state_checkpoints

    config = _deit_config("none", steps=6)
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    full = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": No space left on device "
                      "[os_error_code='28']")
    real_save = ocp.CheckpointManager.save
    failing = {"armed": False}

    def save(self, step, *args, **kwargs):
        if step == 3:
            if when == "when saving":
                raise full
            failing["armed"] = True
        return real_save(self, step, *args, **kwargs)

    def check_for_errors(self):
        if failing["armed"]:
            raise full

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check_for_errors)
    with pytest.raises(CheckpointSaveError) as err:
        methods.train_and_evaluate(config, str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"Could not write the checkpoint of step 3 to {tmp_path}/checkpoints: "
                              "RESOURCE_EXHAUSTED") and "No space left on device" in message
    assert "The last good checkpoint is step 2" in message and "Free space" in message and "--workdir" in message
    assert max(m["step"] for m in _metrics(str(tmp_path))) <= 3  # stopped at the next step boundary
    assert state_checkpoints._finished_steps(os.path.join(tmp_path, "checkpoints"))[-1] <= 3
    monkeypatch.undo()
    step, saved = _restore_raw(str(tmp_path), 2)
    assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved)
                             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def test_a_workdir_that_cannot_be_written_is_one_message_before_any_compute(tmp_path, monkeypatch):
    import tensorflow as tf

    from vitdistill.errors import CheckpointSaveError

    def read_only(path, mode="r"):
        if "w" in mode:
            raise tf.errors.PermissionDeniedError(None, None, f"{path}; Read-only file system")
        return real(path, mode)

    real = tf.io.gfile.GFile
    monkeypatch.setattr(tf.io.gfile, "GFile", read_only)
    with pytest.raises(CheckpointSaveError, match=r"Cannot write checkpoints to .*run/checkpoints: .*Read-only file "
                                                  r"system\. Nothing was trained\. No checkpoint is there yet\. Make "
                                                  r"the directory writable"):
        methods.train_and_evaluate(_deit_config("none"), str(tmp_path / "run"))
    assert not os.listdir(tmp_path / "run" / "checkpoints") and not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert not os.path.exists(tmp_path / "run" / "config.json")


def _without_file_permission_override():
    """The command prefix that runs a process without the power to ignore file permissions: none where this
    process has no such power (not root), `setpriv` dropping CAP_DAC_OVERRIDE where it is root (a read-only
    directory is writable to root otherwise); None where root cannot drop it here."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run(prefix + ["true"], capture_output=True).returncode:
        return None
    return prefix


def test_a_read_only_checkpoints_directory_stops_a_resumed_run_before_it_trains(tmp_path, monkeypatch):
    """A real read-only `checkpoints/` (no monkeypatching; as root, in a process without CAP_DAC_OVERRIDE):
    the resumed run stops before any compute with one line that names the directory, the cause and the
    checkpoint kept, and leaves that checkpoint as it was. (Before, the run trained on and the failure came
    from orbax's background writer at the first save.)"""
    import subprocess
    import sys

    prefix = _without_file_permission_override()
    if prefix is None:
        pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here")
    import legacy_workdirs

    for name, entry in legacy_workdirs.NANO_MODELS.items():
        monkeypatch.setitem(models.MODELS, name, entry)
    workdir = tmp_path / "run"
    methods.train_and_evaluate(legacy_workdirs.dino_config(max_steps=1), str(workdir))
    checkpoints = workdir / "checkpoints"
    before = sorted(os.listdir(checkpoints))
    checkpoints.chmod(0o555)
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        run = subprocess.run(prefix + [sys.executable, os.path.join(here, "nano_main.py"),
                                       "--config=" + os.path.join(here, "nano_config.py") + ":dino",
                                       f"--workdir={workdir}"],
                             cwd=os.path.dirname(here), capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
    finally:
        checkpoints.chmod(0o755)
    lines = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if line.startswith("vitdistill:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"vitdistill: Cannot write checkpoints to {checkpoints}: "), lines
    assert "Permission denied. Nothing was trained. Its last good checkpoint, step 1, is untouched" in lines[0]
    assert sorted(os.listdir(checkpoints)) == before == ["1"]


def _emulate_transfer_guard_on_the_cpu(monkeypatch):
    """Makes jax.transfer_guard_device_to_host("disallow") bite on the CPU as it does on GPUs and TPUs: CPU arrays
    live in host memory, so JAX lets every read through there; here each way of reading an array's value (and
    waiting for it) raises inside such a guard."""
    from jax._src import array, config

    def guarded(name, read):
        def check(self, *args, **kwargs):
            if config.transfer_guard_device_to_host.value == "disallow":
                raise RuntimeError(f"Disallowed device-to-host transfer ({name}) of an array {self.shape}")
            return read(self, *args, **kwargs)
        return check

    value = array.ArrayImpl._value
    monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded("_value", value.fget)))
    for name in ("__array__", "item", "tolist", "__float__", "__int__", "__bool__", "__index__",
                 "block_until_ready"):
        monkeypatch.setattr(array.ArrayImpl, name, guarded(name, getattr(array.ArrayImpl, name)))


@pytest.mark.parametrize("method", ["deit", "dino"])
def test_steps_that_neither_log_nor_save_make_no_device_to_host_transfer(tmp_path, monkeypatch, method):
    """The host never waits for the devices between logged steps: the loop runs each step that neither logs
    nor saves under jax.transfer_guard_device_to_host(STEP_TRANSFER_GUARD). With "disallow" a run of 6 steps,
    logging and saving at the last only, trains through, its metrics fetched at that step alone; with a
    progress bar that reads every step's loss, the same guard stops the run."""
    import legacy_workdirs

    from vitdistill import models
    from vitdistill.train import loop
    from vitdistill.train.reporting import Reporter

    for name, entry in legacy_workdirs.NANO_MODELS.items():
        monkeypatch.setitem(models.MODELS, name, entry)
    _emulate_transfer_guard_on_the_cpu(monkeypatch)
    monkeypatch.setattr(loop, "STEP_TRANSFER_GUARD", "disallow")
    config = legacy_workdirs.deit_config(max_steps=6) if method == "deit" else legacy_workdirs.dino_config(6)
    config.log_every_steps = config.checkpoint_every_steps = 6
    if method == "deit":
        config.teacher.train.log_every_steps = 2  # the teacher's run is guarded too
    assert methods.train_and_evaluate(config, str(tmp_path / "guarded"))["step"] == 6
    assert [m["step"] for m in _metrics(str(tmp_path / "guarded")) if m["split"] == "train"] == [6]
    if method == "deit":
        return

    jit_train_step, advance, latest = loop.jit_train_step, Reporter.advance, {}

    def recording(*args, **kwargs):
        jitted = jit_train_step(*args, **kwargs)

        def step(*inputs):
            latest["out"] = jitted(*inputs)
            return latest["out"]

        return step

    def reads_the_loss(self, step, postfix=None):  # a progress bar showing every step's loss
        if postfix is None:
            postfix = {"loss": float(latest["out"][1]["loss"])}
        return advance(self, step, postfix)

    monkeypatch.setattr(loop, "jit_train_step", recording)
    monkeypatch.setattr(Reporter, "advance", reads_the_loss)
    with pytest.raises(RuntimeError, match=r"Disallowed device-to-host transfer \(__float__\)"):
        methods.train_and_evaluate(config, str(tmp_path / "reads_the_loss"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (root, where mounting is allowed; else the test is skipped): room for the
    nano DINO workdir's first two checkpoints (about 0.45 MiB each), not for a third."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1024k", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root and a system that allows it")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


_CLOSED_LOOP_SCRIPT = """
import asyncio, sys, time
import tensorstore as ts
if sys.argv[1] == "quiet":
    from vitdistill.train import state_checkpoints
    state_checkpoints.quiet_orbax_errors()

async def start_a_write():  # what orbax's save does: awaits tensorstore writes in an event loop of its own
    array = await ts.open({"driver": "zarr", "kvstore": {"driver": "memory"}, "create": True,
                           "metadata": {"shape": [4_000_000], "dtype": "<f4"}})
    future = array.write(1.0)

    async def wait():
        await future.commit
    asyncio.ensure_future(wait())
    await asyncio.sleep(0)
    return array

loop = asyncio.new_event_loop()
array = loop.run_until_complete(start_a_write())
loop.close()  # as orbax does when the first write of a save fails, the others still in flight
time.sleep(2)

class Other:  # any other unraisable error is still shown
    def __del__(self):
        raise ValueError("another unraisable error")
Other()
"""


def test_writes_finishing_after_orbax_closed_their_event_loop_print_nothing():
    """The tracebacks of the full-disk case, reproduced without a disk: a tensorstore write that finishes after
    its event loop was closed reports RuntimeError('Event loop is closed') as an unraisable error (136 of them on
    the 1 MiB disk). Without `quiet_orbax_errors` they are printed (the scenario is real); with it, only they are
    dropped: another unraisable error is still printed."""
    import subprocess
    import sys

    outputs = {}
    for mode in ("plain", "quiet"):
        done = subprocess.run([sys.executable, "-c", _CLOSED_LOOP_SCRIPT, mode], capture_output=True, text=True,
                              timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[mode] = done.stderr
    assert "Event loop is closed" in outputs["plain"]
    assert "Event loop is closed" not in outputs["quiet"] and "Traceback" not in outputs["quiet"].split(
        "another unraisable")[0].split("Exception ignored")[0]
    assert "ValueError: another unraisable error" in outputs["quiet"]


def test_a_full_disk_stops_the_run_with_one_line_and_the_last_good_checkpoint_resumes_bit_identically(
        tmp_path, small_disk):
    """A real full disk (no monkeypatching): nano DINO checkpointing every step on a 1 MiB tmpfs. The save that
    does not fit stops the run with exit status 2 and one line naming the step, the cause and the last good
    checkpoint, with no traceback; the workdir copied to another disk, as the line says, resumes from that
    checkpoint and ends bit-identical to an uninterrupted run. (Before `quiet_orbax_errors` caught the
    unraisable "Event loop is closed" errors, it failed 2 runs in 3 on them.)"""
    import re
    import shutil
    import subprocess
    import sys

    from test_scale_out import _assert_same_state

    here = os.path.dirname(os.path.abspath(__file__))

    def run(workdir):
        return subprocess.run([sys.executable, os.path.join(here, "nano_main.py"),
                               "--config=" + os.path.join(here, "nano_config.py") + ":dino", f"--workdir={workdir}",
                               "--config.max_steps=4", "--config.checkpoint_every_steps=1"],
                              cwd=os.path.dirname(here), capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))

    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    full = run(small_disk / "run")
    lines = [line for line in full.stderr.splitlines() if line.startswith("vitdistill:")]
    assert full.returncode == 2 and "Traceback" not in full.stderr and len(lines) == 1, full.stderr[-3000:]
    found = re.match(r"vitdistill: Could not write the checkpoint of step (\d) to .*/disk/run/checkpoints: .*No space "
                     r"left on device.*The last good checkpoint is step (\d) in .*copy the workdir to another disk",
                     lines[0])
    assert found and int(found[2]) == int(found[1]) - 1 >= 1, lines[0]
    moved = tmp_path / "moved"
    shutil.copytree(small_disk / "run", moved)
    resumed = run(moved)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {found[2]}/4" in resumed.stdout + resumed.stderr
    assert _assert_same_state(str(moved), str(tmp_path / "reference"), exact=True) == 4
