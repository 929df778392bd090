"""Workdirs written by the code before each method had its own state (commit 8802cdc, one TrainState with every
method's fields; tests/fixtures/make_legacy_workdirs.py) resume with today's code into the run an uninterrupted
one makes: a distilled DeiT with a model EMA whose teacher (itself a legacy workdir) trained first, and DINO
with BatchNorm in its head.

First, today's code trained from scratch to the fixtures' step must reproduce the state the old code saved
there: the methods' steps did not change. Then the legacy workdir resumes to step 4 and must end where today's
uninterrupted run ends.
"""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import legacy_workdirs
from vitdistill import methods, models

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", legacy_workdirs.ROOT_NAME)
CONFIGS = {"deit": legacy_workdirs.deit_config, "dino": legacy_workdirs.dino_config}
# The two sides ran on different machines at different times: float32 rounding may differ a little, a changed
# computation would not (one step of these nano models moves parameters by ~1e-3).
ATOL, RTOL = 2e-6, 1e-5
# Since the fixtures were written, each of the two devices takes every second position of a batch (as
# DistributedSampler's ranks do) instead of one half: the same examples in another row order. That alone moves
# DINO's Adam moments after 2 steps by up to 1.5e-5 (measured: the same batch in both orders through today's
# step) and its parameters by 2e-8, and the legacy state carries that rounding on when it resumes: the moments
# get this much room in both comparisons.
MOMENTS_ATOL = 1e-4


def _the_fixtures_code(monkeypatch):
    """Seven deliberate changes since the fixtures were written, undone for the reproduction so that it keeps
    checking everything else: mixup draws per device (the test's config sets one group), the CutMix box
    follows timm 0.3.2 (the fixtures' code used later timm's, a pixel longer on odd sides), weights start
    from timm's trunc_normal_(std=.02) (the fixtures' code used Flax's truncated_normal(0.02), truncated at
    2 standard deviations), and every resize is PIL's, in uint8 levels (the fixtures' code kept TF's float
    resize, unrounded), RandAugment applied by Pillow (the fixtures' code: TF ops, image_ops='tf'
    here), erasing's noise drawn for the box alone (the fixtures' code drew a whole image's), and DeiT's
    images normalised and erased in the pipeline (today's ships uint8 levels and the erase box; the step
    normalises and draws the noise, from JAX's generator instead of TF's)."""
    import functools

    import flax.linen as nn
    import tensorflow as tf

    from vitdistill.data import deit_transforms, mixup
    from vitdistill.models import dino, vit

    def unrounded_resize(image, size, *, method="bicubic", resize="pil"):
        del resize
        resized = tf.image.resize(tf.cast(image, tf.float32), size, method=method, antialias=True)
        return tf.clip_by_value(resized, 0.0, 255.0)

    def full_image_noise_erasing(image, seed, p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), max_attempts=10):
        box_seed, noise_seed = deit_transforms.split_seed(seed, 2)
        shape = tf.shape(image)
        erase, top, left, erase_h, erase_w = deit_transforms.sample_erase_box(
            box_seed, shape[0], shape[1], p=p, scale=scale, ratio=ratio, attempts=max_attempts)
        rows, cols = tf.range(shape[0])[:, None, None], tf.range(shape[1])[None, :, None]
        inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
        noise = tf.random.stateless_normal(shape, noise_seed, dtype=image.dtype)
        return tf.cond(erase, lambda: tf.where(inside, noise, image), lambda: image)

    in_the_pipeline = deit_transforms.deit_train_transform

    def normalised_and_erased_in_the_pipeline(image, seed, *, levels=False, **kwargs):
        del levels
        return {"image": in_the_pipeline(image, seed, **kwargs)}  # float32: the step takes it as it is

    monkeypatch.setattr(deit_transforms, "deit_train_transform", normalised_and_erased_in_the_pipeline)
    monkeypatch.setattr(deit_transforms, "resize_levels", unrounded_resize)
    monkeypatch.setattr(deit_transforms, "random_erasing", full_image_noise_erasing)
    monkeypatch.setattr(deit_transforms, "image_ops_of", lambda data: "tf")
    monkeypatch.setattr(mixup, "cutmix_box", functools.partial(mixup.cutmix_box, rule="timm_1.0"))
    flax_init = nn.initializers.truncated_normal(stddev=0.02)
    monkeypatch.setattr(vit, "trunc_normal_02", flax_init)
    monkeypatch.setattr(dino, "trunc_normal_02", flax_init)


@pytest.fixture(autouse=True)
def nano_models(monkeypatch):
    for name, entry in legacy_workdirs.NANO_MODELS.items():
        monkeypatch.setitem(models.MODELS, name, entry)


def _saved(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        assert step in manager.all_steps(), (workdir, manager.all_steps())
        return manager.restore(step, args=ocp.args.StandardRestore())


def _assert_same_state(legacy, today, what, moments_atol=ATOL):
    """Every field of today's state equals the legacy one; the legacy fields today's method lacks are empty."""
    dropped = set(legacy) - set(today)
    assert dropped <= {"ema_params", "teacher_params", "center"} and all(legacy[k] == {} for k in dropped), dropped
    assert set(today) <= set(legacy)
    for key in sorted(today):
        assert jax.tree.structure(legacy[key]) == jax.tree.structure(today[key]), (what, key)
        for a, b in zip(jax.tree.leaves(legacy[key]), jax.tree.leaves(today[key])):
            atol = moments_atol if key == "opt_state" else ATOL
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=atol, err_msg=f"{what}: {key}")


@pytest.mark.parametrize("method", ["deit", "dino"])
def test_a_legacy_workdir_resumes_into_the_uninterrupted_run(tmp_path, capsys, monkeypatch, method):
    _the_fixtures_code(monkeypatch)
    legacy, fresh = str(tmp_path / "legacy"), str(tmp_path / "fresh")
    shutil.copytree(os.path.join(FIXTURES, method), legacy)
    step = legacy_workdirs.SAVED_AT

    def config(max_steps):
        made = CONFIGS[method](max_steps=max_steps)
        if method == "deit":
            made.mixup.groups = 1  # the fixtures' code mixed the 2 devices' batch with one draw
        return made

    methods.train_and_evaluate(config(max_steps=step), fresh)
    if method == "deit":  # DINO's colour jitter now works on PIL's uint8 levels (c5e03be): other crops, by design
        _assert_same_state(_saved(legacy, step), _saved(fresh, step), f"{method} at step {step}", MOMENTS_ATOL)
    if method == "deit":
        _assert_same_state(_saved(os.path.join(legacy, "teacher"), 2), _saved(os.path.join(fresh, "teacher"), 2),
                           "the teacher")
    capsys.readouterr()

    methods.train_and_evaluate(config(max_steps=4), legacy)
    out = capsys.readouterr().out
    assert f"resuming at step {step}/4" in out
    if method == "deit":
        assert "resuming at step 2/2" in out  # the legacy teacher workdir, found finished
    methods.train_and_evaluate(config(max_steps=4), fresh)
    resumed, uninterrupted = _saved(legacy, 4), _saved(fresh, 4)
    assert sorted(resumed) == sorted(uninterrupted)  # saved again in today's layout
    if method == "deit":  # DINO's first 2 steps saw the old jitter's crops: its later state differs by design
        _assert_same_state(resumed, uninterrupted, f"{method} at step 4", MOMENTS_ATOL)
