"""The warnings for small-data failure modes (vitdistill/train/diagnostics.py): their rules at the
boundaries, and whole nano runs driven into each failure (a DINO teacher made uniform, one made one-hot
on a single output, a supervised loss that does not move) that must print the warning and its advice."""
import math

import legacy_workdirs
import pytest

from vitdistill import methods, recipes, small_data
from vitdistill.train import diagnostics


def _dino(step, entropy, marginal):
    return {"teacher_entropy": entropy, "teacher_marginal_entropy": marginal, "teacher_student_kl": 0.1}


def test_dino_rules_at_their_boundaries():
    k, batch = 1024, 64
    log_k = math.log(k)
    health = diagnostics.DinoHealth.for_run(out_dim=k, global_batch=batch, total_steps=1000, warmup_steps=50,
                                            teacher_warmup_steps=0)
    assert health.start_step == 100  # 10% of the run, past the 50-step warm-up
    healthy = (0.5 * log_k, math.log(40.0))  # sharp-ish rows spread over 40 of the batch's 64 images
    for step in (100, 110, 120, 130):
        assert health(step, _dino(step, *healthy)) is None
    # Before the start step nothing is judged, however uniform.
    early = diagnostics.DinoHealth.for_run(out_dim=k, global_batch=batch, total_steps=1000, warmup_steps=300,
                                           teacher_warmup_steps=0)
    assert all(early(s, _dino(s, log_k, log_k)) is None for s in range(0, 300, 10))
    # Just under 3/4 of log K is not "towards uniform"; just over it, three logged steps in a row, is.
    fresh = diagnostics.DinoHealth(out_dim=k, global_batch=batch, start_step=0)
    assert all(fresh(s, _dino(s, 0.749 * log_k, log_k)) is None for s in range(5))
    fresh = diagnostics.DinoHealth(out_dim=k, global_batch=batch, start_step=0)
    said = [fresh(s, _dino(s, 0.751 * log_k, log_k)) for s in range(5)]
    assert said[:2] == [None, None] and said[3:] == [None, None]  # after three in a row, once
    assert "towards uniform" in said[2] and "config.dino.teacher_temp" in said[2]
    assert "config.dino.momentum_teacher" in said[2] and "config.model.out_dim 1024 -> 256" in said[2]
    # One noisy step does not count: the window must hold it throughout.
    fresh = diagnostics.DinoHealth(out_dim=k, global_batch=batch, start_step=0)
    values = [0.8, 0.8, 0.7, 0.8, 0.8]
    assert all(fresh(s, _dino(s, v * log_k, log_k)) is None for s, v in enumerate(values))
    # A few outputs: fewer than max(2, min(K, B) / 16) = 4 effective outputs for a batch of 64.
    fresh = diagnostics.DinoHealth(out_dim=k, global_batch=batch, start_step=0)
    assert all(fresh(s, _dino(s, 0.1, math.log(4.1))) is None for s in range(5))
    fresh = diagnostics.DinoHealth(out_dim=k, global_batch=batch, start_step=0)
    said = [fresh(s, _dino(s, 0.1, math.log(3.9))) for s in range(4)]
    assert said[2] is not None and "onto a few outputs" in said[2] and "about 3.9 of K = 1024" in said[2]
    assert "config.dino.center_momentum" in said[2] and said[3] is None
    # With a batch of 16 the floor is 2 outputs, not 1: one image per output is fine, one output is not.
    small = diagnostics.DinoHealth(out_dim=k, global_batch=16, start_step=0)
    assert small.floor == 2.0


def test_supervised_rule_at_its_boundary():
    classes = 10
    start = math.log(classes)

    def warnings(share, distilled=False):
        health = diagnostics.SupervisedHealth(num_classes=classes, total_steps=400, distilled=distilled)
        key = "loss_base" if distilled else "loss"
        return [health(s, {"loss": 99.0, key: share * start}) for s in range(0, 401, 20)]

    moving = warnings(0.89)
    assert moving == [None] * len(moving)
    stalled = warnings(0.91)
    assert stalled[:5] == [None] * 5  # nothing before 25% of the run (step 100)
    assert "hardly moved" in stalled[5] and "step 100/400" in stalled[5] and "91% of log C = 2.303" in stalled[5]
    assert "config.optim.lr" in stalled[5] and "config.distill.kind=hard" in stalled[5]
    assert stalled[6:] == [None] * (len(stalled) - 6)  # said once
    # Distilled: the cross-entropy part is judged, not the total (whose distillation part has its own scale).
    assert "cross-entropy part" in warnings(0.91, distilled=True)[5]
    assert warnings(0.89, distilled=True)[5] is None
    # The digits quick start's distilled student (94.15% top-1 at its end) logged these at steps 460-560 of
    # 2,200 (metrics.jsonl at 9a102fa): 0.82 of log C at a quarter of the run, no warning.
    quick = diagnostics.SupervisedHealth(num_classes=10, total_steps=2200, distilled=True)
    logged = (1.868, 1.864, 1.956, 1.934, 1.982, 1.749)
    assert all(quick(s, {"loss_base": v}) is None for s, v in zip(range(460, 580, 20), logged))


# Whole runs, driven into each failure mode.

def _dino_run(**changes):
    config = recipes.dino("vit_micro_patch4_32")
    small_data.runlocal(config)
    config.batch_size = 16
    config.max_steps = 12
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1000
    config.multicrop.global_size = 16
    config.multicrop.local_size = 8
    config.multicrop.num_local = 2
    config.knn.before_training = False
    config.knn.train_limit = 32
    config.knn.eval_limit = 16
    config.optim.warmup_epochs = 0.0
    config.dino.warmup_teacher_temp_epochs = 0.0
    return legacy_workdirs.with_overrides(config, changes)


def test_a_dino_teacher_made_uniform_is_warned_with_its_remedies(tmp_path, capsys):
    config = _dino_run(**{"dino.teacher_temp": 100.0, "dino.warmup_teacher_temp": 100.0})
    methods.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "the DINO teacher's output is drifting towards uniform" in out, out[-2000:]
    assert "lower config.dino.teacher_temp" in out and "config.dino.momentum_teacher" in out
    assert "onto a few outputs" not in out
    assert out.count("WARNING step") == 1


def test_a_dino_teacher_made_one_hot_on_one_output_is_warned_with_its_remedies(tmp_path, capsys):
    """No centring (its momentum 1 keeps the centre at 0), no BatchNorm in the head, a very sharp teacher and
    a high lr: within 4 steps every image's teacher row is one-hot on the same output (marginal entropy 0),
    the collapse to one dimension that the DINO paper shows without centring (§5.3); before it, a fresh
    teacher spreads 32 images over about 5 outputs."""
    config = _dino_run(**{"dino.teacher_temp": 1e-3, "dino.warmup_teacher_temp": 1e-3, "batch_size": 32,
                          "dino.center_momentum": 1.0, "model.use_bn_in_head": False, "optim.lr": 5e-2})
    methods.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "the DINO teacher is collapsing onto a few outputs" in out, out[-2000:]
    assert "config.dino.center_momentum" in out and "raise config.dino.teacher_temp" in out
    assert "towards uniform" not in out


def test_a_supervised_loss_that_does_not_move_is_warned_with_its_remedies(tmp_path, capsys):
    config = recipes.deit("deit_micro_patch4_32")
    config.distill.kind = "none"
    small_data.runlocal(config)
    config.data.image_size = 16
    config.batch_size = 16
    config.max_steps = 12
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1000
    config.data.eval_limit = 16
    config.augment.rand_augment = False
    config.optim.lr = 1e-9  # nothing moves
    config.optim.warmup_lr = 1e-9
    config.optim.min_lr = 1e-9
    methods.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "deit_micro_patch4_32's loss has hardly moved" in out, out[-2000:]
    assert "step 3/12" in out and "config.optim.lr x 0.5" in out


def test_the_teacher_momentum_rule_gives_the_official_and_the_swept_values():
    """1 - m = 1 / (0.7 sqrt(T)) to one significant figure: the official 0.996 for 100 ImageNet epochs at batch
    1024 (1,251 steps an epoch), 0.98 for the Fashion-MNIST config's 4,216 steps (the value it used),
    0.96 for the digits quick start's 1,320 (where it was tried after being written), never below 0.9."""
    assert small_data.teacher_momentum(100 * (1_281_167 // 1024)) == 0.996
    assert small_data.teacher_momentum(4216) == 0.98
    assert small_data.teacher_momentum(1320) == 0.96
    assert small_data.teacher_momentum(50) == small_data.teacher_momentum(1) == 0.9
    with pytest.raises(ValueError):
        small_data.teacher_momentum(0)
    quick = small_data.small_dino("digits", image_size=16, local_size=8, num_local=4, epochs=60)
    fashion = small_data.small_dino("fashion_mnist", image_size=28, local_size=14, num_local=6, epochs=4.5,
                                    patch_size=7)
    assert (quick.dino.momentum_teacher, fashion.dino.momentum_teacher) == (0.96, 0.98)
