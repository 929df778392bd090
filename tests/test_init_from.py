"""`init_from` and the teacher read a training workdir's weights: a DINO workdir gives its teacher (the EMA, what
DINO evaluates and releases) unless the student is asked for, and the log line says what was loaded, what
stays freshly initialised and what the model does not use. The workdir is the committed nano DINO fixture
(tests/fixtures/legacy_workdirs/dino, step 2); the expected arrays are read from it by orbax directly.
"""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import legacy_workdirs
from vitdistill import models, weights
from vitdistill.errors import CheckpointError

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", legacy_workdirs.ROOT_NAME, "dino")


@pytest.fixture(autouse=True)
def nano_models(monkeypatch):
    for name, entry in legacy_workdirs.NANO_MODELS.items():
        monkeypatch.setitem(models.MODELS, name, entry)


@pytest.fixture
def dino_workdir(tmp_path):
    workdir = str(tmp_path / "dino")
    shutil.copytree(FIXTURE, workdir)
    return workdir


def _orbax(workdir):
    with ocp.PyTreeCheckpointer() as checkpointer:
        path = os.path.join(workdir, "checkpoints", str(legacy_workdirs.SAVED_AT), "default")
        tree = checkpointer.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    return all(np.array_equal(x, y) for (_, x), (_, y) in zip(flat_a, flat_b))


def test_a_dino_workdir_gives_its_teacher_by_default_and_its_student_on_request(dino_workdir):
    saved = _orbax(dino_workdir)
    assert not _equal(saved["teacher_params"], saved["params"])  # two steps apart enough to tell them apart
    auto = weights.read_weights(dino_workdir)
    assert _equal(auto.variables["params"], saved["teacher_params"])
    assert _equal(auto.variables["batch_stats"], saved["batch_stats"])
    assert auto.model == "vit_nano_patch4_16"
    assert auto.description == f"the teacher of the training workdir {dino_workdir} at step 2"
    assert _equal(weights.read_weights(dino_workdir, "teacher").variables["params"], saved["teacher_params"])
    student = weights.read_weights(dino_workdir, "student")
    assert _equal(student.variables["params"], saved["params"])
    assert student.description.startswith("the student of")
    with pytest.raises(CheckpointError, match=r"has no ema network \(its state has: student, teacher\)"):
        weights.read_weights(dino_workdir, "ema")
    with pytest.raises(CheckpointError, match="network='best'; valid: auto, student, teacher, ema"):
        weights.read_weights(dino_workdir, "best")


def test_fine_tuning_from_a_dino_workdir_loads_the_teacher_backbone_and_says_what_is_new(dino_workdir):
    saved = _orbax(dino_workdir)
    model = models.create("deit_nano_patch4_16")  # a classifier on the DINO backbone: the head is new
    like = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    variables, report = weights.load_pretrained(dino_workdir, like)
    params = jax.tree.map(np.asarray, variables["params"])
    backbone = saved["teacher_params"]["backbone"]
    for name in backbone:
        assert _equal(params[name], backbone[name]), name
    assert _equal(params["head"], jax.tree.map(np.asarray, like["params"]["head"]))  # fresh
    loaded = len(jax.tree.leaves(backbone))
    assert report.startswith(f"init_from: the teacher of the training workdir {dino_workdir} at step 2: "
                             f"{loaded} arrays loaded; new (fresh init): head/bias, head/kernel; not used: ")
    unused = len(jax.tree.leaves(saved["teacher_params"]["head"]))
    assert f"not used: {unused} (head/" in report
