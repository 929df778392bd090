"""The official schedules of DeiT (timm's CosineLRScheduler) and DINO (utils.cosine_scheduler).

Each is a closed form of the step, usable inside jit, so a long run never builds a table
of one value per iteration. Durations are read in epochs, as the papers state them, and
resolved to steps by `epochs_to_steps` alone; a run's length by `run_length`.
"""
from typing import NamedTuple

import jax.numpy as jnp

from vitdistill import data
from vitdistill.errors import ConfigError


class RunLength(NamedTuple):
    steps_per_epoch: int
    total_steps: int


def run_length(config, num_examples: int, repeats: int = 1, keep_partial: bool = False) -> RunLength:
    """Steps per epoch and in all: an epoch is one pass over `num_examples` at the global batch, its last
    partial batch dropped (with `repeats` > 1, DeiT's repeated augmentation: RASampler's epoch,
    `data.steps_per_epoch`; the pipeline's epochs are the same); with `keep_partial` (the linear probe) the
    last partial batch is kept.

    `config.epochs = 0` means no training: the run only evaluates (a converted checkpoint, say).
    `config.max_steps` cuts the run short (0 or None: it does not); the schedules still span `config.epochs`.
    """
    if config.epochs is not None and config.epochs < 0:
        raise ConfigError(f"config.epochs={config.epochs}; use a length >= 0 (0: evaluate only, nothing trained)")
    if config.get("max_steps") is not None and config.max_steps < 0:
        raise ConfigError(f"config.max_steps={config.max_steps}; use a count of steps >= 1, or 0 (or unset) for the "
                          "whole run (config.epochs=0 evaluates only)")
    steps_per_epoch = data.steps_per_epoch(num_examples, config.batch_size, repeats, keep_partial)
    total = int(round(config.epochs * steps_per_epoch))
    if config.get("max_steps"):
        total = min(total, int(config.max_steps))
    return RunLength(steps_per_epoch, max(total, 1) if config.epochs > 0 else 0)


def epochs_to_steps(epochs, steps_per_epoch):
    """Steps in `epochs` (which may be fractional) epochs, rounded to the nearest step."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    if epochs < 0:
        raise ValueError(f"A duration in epochs must be >= 0, got {epochs}.")
    return int(round(epochs * steps_per_epoch))


def scaled_lr(base, global_batch, reference_batch):
    """The linear scaling rule: DeiT uses base·batch/512, DINO base·batch/256. A negative `base` (gradient
    ascent) is refused."""
    if base < 0:
        raise ConfigError(f"A learning rate of {base} (config.optim.lr, or config.linear.lrs) is negative: it would "
                          "climb the loss; use a rate > 0")
    return base * global_batch / reference_batch


def _cosine_decay(base, final, left, length):
    """final + (base − final)·(1 + cos(π·done/length))/2, with done = length − left.

    Computed as the endpoint of smaller magnitude plus a sin² term, the same value, so
    float32 keeps its relative precision where the schedule is small (the learning rate's
    last steps, the weight decay's first) instead of cancelling in 1 + cos(≈π).
    """
    if abs(final) <= abs(base):
        return final + (base - final) * jnp.sin(0.5 * jnp.pi * left / length) ** 2
    return base + (final - base) * jnp.sin(0.5 * jnp.pi * (length - left) / length) ** 2


def dino_cosine_schedule(base, final, *, epochs, steps_per_epoch, warmup_epochs=0,
                         start_warmup_value=0.0):
    """DINO's `utils.cosine_scheduler` as a function of the step.

    Warm-up follows `np.linspace(start_warmup_value, base, warmup_steps)`, whose last
    value is `base` itself; the cosine then runs over the remaining steps from `base`
    towards `final` (which it approaches but, like the official table, never reaches).
    DINO uses it for the learning rate, the weight decay and the teacher momentum.
    Steps past the end hold the table's last value, where the official code would
    raise an IndexError.
    """
    total = epochs_to_steps(epochs, steps_per_epoch)
    warmup = epochs_to_steps(warmup_epochs, steps_per_epoch)
    if total <= 0 or warmup > total:
        raise ValueError(
            f"Need 0 <= warmup_epochs <= epochs and epochs > 0, got warmup_epochs={warmup_epochs}, "
            f"epochs={epochs} ({warmup} and {total} steps at {steps_per_epoch} steps per epoch)."
        )
    cosine_steps = total - warmup
    warmup_slope = (base - start_warmup_value) / max(warmup - 1, 1)

    def schedule(step):
        step = jnp.clip(jnp.asarray(step), 0, total - 1)
        warmup_value = start_warmup_value + step * warmup_slope
        cosine_value = _cosine_decay(base, final, total - step, max(cosine_steps, 1))
        return jnp.where(step < warmup, warmup_value, cosine_value)

    return schedule


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, epochs):
    """DINOLoss's per-epoch teacher temperature, a function of the epoch (step // steps_per_epoch).

    `np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)` and then constant: the
    warm-up's last epoch already uses `teacher_temp`. Epochs past the end keep it.
    """
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(
            f"Need 0 <= warmup_teacher_temp_epochs <= epochs, got {warmup_epochs} and {epochs}."
        )
    slope = (teacher_temp - warmup_teacher_temp) / max(warmup_epochs - 1, 1)

    def schedule(epoch):
        epoch = jnp.asarray(epoch)
        return jnp.where(epoch < warmup_epochs, warmup_teacher_temp + epoch * slope, teacher_temp)

    return schedule


def deit_lr_schedule(base_lr, *, epochs, steps_per_epoch, warmup_epochs=5, warmup_lr=1e-6,
                     min_lr=1e-5, per_epoch=True, official_lag=False):
    """timm's CosineLRScheduler as DeiT configures it, a function of the step.

    t_initial = epochs, warmup_t = warmup_epochs (inside the cosine, not a prefix), one
    cycle, then `min_lr`. With `per_epoch` the rate changes once an epoch at
    t = step // steps_per_epoch, as the official run does; otherwise t is the
    fractional epoch step / steps_per_epoch.

    `official_lag` (with `per_epoch`) reproduces DeiT's main.py exactly: it calls
    `lr_scheduler.step(epoch)` after each epoch, so epochs 0 and 1 both train at t = 0 and
    epoch e >= 1 at t = e - 1 (the schedule lags one epoch behind timm's own convention).
    """
    if epochs <= 0 or warmup_epochs < 0:
        raise ValueError(f"Need epochs > 0 and warmup_epochs >= 0, got {epochs} and {warmup_epochs}.")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")

    def schedule(step):
        step = jnp.asarray(step)
        if per_epoch:
            t = step // steps_per_epoch
            if official_lag:
                t = jnp.maximum(t - 1, 0)
        else:
            t = step / steps_per_epoch
        warmup_value = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_epochs, 1)
        cosine_value = _cosine_decay(base_lr, min_lr, epochs - t, epochs)
        value = jnp.where(t < epochs, cosine_value, min_lr)
        return jnp.where(t < warmup_epochs, warmup_value, value)

    return schedule
