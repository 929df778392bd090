"""Schedules against the official ones: DINO's cosine_scheduler (re-implemented in numpy)
and teacher temperature, and timm's CosineLRScheduler object as DeiT configures it."""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitdistill.train import schedules

# conftest imports TensorFlow, which loads its LLVM with RTLD_GLOBAL; triton's libtriton then
# segfaults when timm or torch.optim import it through torch._dynamo. CPU tests never need it.
sys.modules.setdefault("triton", None)


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                              start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler: the whole table, one value per iteration."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, cosine))


def test_epochs_to_steps_and_scaled_lr():
    assert schedules.epochs_to_steps(10, 1251) == 12510
    assert schedules.epochs_to_steps(0.5, 7) == 4  # rounds to the nearest step
    with pytest.raises(ValueError, match="steps_per_epoch"):
        schedules.epochs_to_steps(1, 0)
    assert schedules.scaled_lr(5e-4, 1024, 512) == pytest.approx(1e-3)
    assert schedules.scaled_lr(5e-4, 1024, 256) == pytest.approx(2e-3)


@pytest.mark.parametrize("epochs,steps_per_epoch,warmup_epochs,start", [
    (7, 13, 2, 0.0), (5, 3, 0, 0.0), (4, 10, 1, 1e-5), (3, 1, 1, 0.0),
])
def test_dino_cosine_schedule_matches_official_table(epochs, steps_per_epoch, warmup_epochs, start):
    want = official_cosine_scheduler(5e-4, 1e-6, epochs, steps_per_epoch, warmup_epochs, start)
    schedule = schedules.dino_cosine_schedule(5e-4, 1e-6, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                              warmup_epochs=warmup_epochs, start_warmup_value=start)
    got = np.asarray(jax.vmap(schedule)(jnp.arange(len(want))))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("base,final,warmup_epochs", [
    (5e-4 * 1024 / 256, 1e-6, 10),  # learning rate
    (0.04, 0.4, 0),  # weight decay
    (0.996, 1.0, 0),  # teacher momentum
])
def test_dino_cosine_schedule_on_the_paper_run(base, final, warmup_epochs):
    epochs, steps_per_epoch = 100, 1251
    want = official_cosine_scheduler(base, final, epochs, steps_per_epoch, warmup_epochs)
    schedule = jax.jit(schedules.dino_cosine_schedule(
        base, final, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs))
    warmup = warmup_epochs * steps_per_epoch
    steps = [0, 1, max(warmup - 1, 0), warmup, warmup + 1, len(want) // 2, len(want) - 2, len(want) - 1]
    steps += list(np.random.default_rng(0).integers(0, len(want), size=200))
    got = np.array([float(schedule(s)) for s in steps])
    np.testing.assert_allclose(got, want[steps], rtol=1e-6, atol=0)
    every_step = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(len(want))))
    np.testing.assert_allclose(every_step, want, rtol=1e-6, atol=0)
    if warmup:
        assert float(schedule(warmup - 1)) == pytest.approx(base)  # linspace includes its endpoint
        assert float(schedule(warmup)) == pytest.approx(base)  # the cosine starts at base too
    # Past the end the last value holds.
    assert float(schedule(len(want) + 5)) == pytest.approx(want[-1], rel=1e-6)


def test_dino_cosine_schedule_rejects_warmup_longer_than_run():
    with pytest.raises(ValueError, match="warmup_epochs=5"):
        schedules.dino_cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=10, warmup_epochs=5)


def test_teacher_temp_schedule_paper_warmup():
    warmup_teacher_temp, teacher_temp, warmup_epochs, epochs = 0.04, 0.07, 30, 100
    official = np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
        np.ones(epochs - warmup_epochs) * teacher_temp,
    ))
    schedule = schedules.teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, epochs)
    for epoch, value in [(0, 0.04), (15, 0.04 + 15 * 0.03 / 29), (29, 0.07), (30, 0.07), (99, 0.07)]:
        assert official[epoch] == pytest.approx(value)
        assert float(schedule(epoch)) == pytest.approx(value, rel=1e-6)
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(epochs)))
    np.testing.assert_allclose(got, official, rtol=1e-6)
    # Used with the step: epoch = step // steps_per_epoch.
    assert float(schedule(jnp.int32(15 * 1251 + 1250) // 1251)) == pytest.approx(official[15], rel=1e-6)


def test_teacher_temp_schedule_default_is_constant():
    schedule = schedules.teacher_temp_schedule(0.04, 0.04, 0, 100)
    np.testing.assert_allclose(jax.vmap(schedule)(jnp.arange(100)), 0.04, rtol=1e-6)


def timm_cosine(torch, base_lr, epochs, warmup_epochs, warmup_lr, min_lr):
    """timm's CosineLRScheduler built as DeiT's create_scheduler builds it (timm 0.3.2)."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    return optimizer, CosineLRScheduler(
        optimizer, t_initial=epochs, lr_min=min_lr, cycle_mul=1.0, cycle_decay=0.1, cycle_limit=1,
        warmup_lr_init=warmup_lr, warmup_t=warmup_epochs, t_in_epochs=True, noise_range_t=None)


def test_deit_lr_schedule_matches_timm_per_epoch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    base_lr, epochs, steps_per_epoch = 5e-4 * 1024 / 512, 300, 1251
    optimizer, scheduler = timm_cosine(torch, base_lr, epochs, 5, 1e-6, 1e-5)
    schedule = jax.jit(schedules.deit_lr_schedule(base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch))
    rng = np.random.default_rng(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)  # set at construction
    for epoch in list(range(epochs + 10)):
        scheduler.step(epoch)
        want = optimizer.param_groups[0]["lr"]
        for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + int(rng.integers(steps_per_epoch)),
                     (epoch + 1) * steps_per_epoch - 1):
            assert float(schedule(step)) == pytest.approx(want, rel=2e-6, abs=1e-12), (epoch, step)


def test_deit_lr_schedule_fractional_epochs_match_timm():
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    base_lr, epochs, steps_per_epoch = 1e-3, 30, 7
    optimizer, scheduler = timm_cosine(torch, base_lr, epochs, 5, 1e-6, 1e-5)
    schedule = schedules.deit_lr_schedule(base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                          per_epoch=False)
    for step in range(0, (epochs + 2) * steps_per_epoch, 3):
        scheduler.step(step / steps_per_epoch)
        want = optimizer.param_groups[0]["lr"]
        assert float(schedule(step)) == pytest.approx(want, rel=2e-6, abs=1e-12), step


def test_deit_lr_schedule_matches_timm_create_scheduler_with_deit_args():
    torch = pytest.importorskip("torch")
    timm_scheduler = pytest.importorskip("timm.scheduler")
    args = argparse.Namespace(  # facebookresearch/deit main.py defaults
        sched="cosine", epochs=300, lr=5e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5,
        decay_epochs=30, decay_rate=0.1, cooldown_epochs=10, patience_epochs=10,
        lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler, _ = timm_scheduler.create_scheduler(args, optimizer)
    schedule = jax.jit(schedules.deit_lr_schedule(args.lr, epochs=300, steps_per_epoch=10))
    for epoch in (0, 1, 4, 5, 6, 150, 298, 299, 300, 305):
        scheduler.step(epoch)
        assert float(schedule(epoch * 10 + 3)) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=2e-6, abs=1e-12), epoch


def test_the_384_fine_tuning_recipe_warms_up_as_deits_main_py():
    """main.py --finetune keeps its default warm-up: timm 0.3.2's CosineLRScheduler(t_initial=30, warmup_t=5,
    warmup_lr_init=1e-6, lr_min=5e-6) at lr 5e-6 (batch 512), written out: epoch t < 5 trains at
    1e-6 + t * (5e-6 - 1e-6) / 5, later at lr_min + (lr - lr_min)(1 + cos(pi t / 30)) / 2 = 5e-6; and
    main.py steps it after each epoch, so epoch e trains at t = max(e - 1, 0)."""
    import os

    from ml_collections import config_flags

    from vitdistill.methods import deit
    from vitdistill.train.schedules import RunLength

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_flags.config_flags._LoadConfigModule(
        "config", os.path.join(root, "configs", "deit_b_384.py")).get_config()
    assert config.distill.kind == "none"  # main.py raises NotImplementedError for fine-tuning with distillation
    setup = deit.make_setup(config, num_classes=1000, length=RunLength(steps_per_epoch=10, total_steps=300))
    for epoch in range(8):
        t = max(epoch - 1, 0)
        want = 1e-6 + t * (5e-6 - 1e-6) / 5 if t < 5 else 5e-6 + (5e-6 - 5e-6) * (1 + np.cos(np.pi * t / 30)) / 2
        for step in (10 * epoch, 10 * epoch + 9):
            assert float(setup.lr(step)) == pytest.approx(want, rel=1e-6), (epoch, step)


@pytest.mark.parametrize("key, value, message", [
    ("max_steps", -1, r"config.max_steps=-1; use a count of steps >= 1, or 0 \(or unset\) for the whole run"),
    ("epochs", -2.0, r"config.epochs=-2.0; use a length >= 0"),
])
def test_a_negative_run_length_is_refused(key, value, message):
    from ml_collections import ConfigDict

    from vitdistill.errors import ConfigError

    config = ConfigDict({"epochs": 3.0, "batch_size": 8, "max_steps": None})
    assert schedules.run_length(config, 80) == schedules.RunLength(10, 30)
    config.max_steps = 0  # 0: no limit, as unset
    assert schedules.run_length(config, 80) == schedules.RunLength(10, 30)
    config[key] = value
    with pytest.raises(ConfigError, match=message):
        schedules.run_length(config, 80)


def test_a_negative_learning_rate_is_refused():
    from vitdistill.errors import ConfigError

    assert schedules.scaled_lr(5e-4, 1024, 512) == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"learning rate of -1.0 .* is negative"):
        schedules.scaled_lr(-1.0, 1024, 512)
