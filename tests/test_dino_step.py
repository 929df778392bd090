"""DINO's train step against SPEC §4's formulas: EMA teacher, center, schedules, frozen last layer,
per-tensor clipping, and a bfloat16 step. The step is called as a plain function, with no data source."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import legacy_workdirs

from vitdistill import recipes, small_data
from vitdistill.data.multicrop import view_names
from vitdistill.methods import dino

STEPS_PER_EPOCH = 4  # the config's 32 training examples at batch 8


def _config(**changes):
    config = recipes.dino("vit_micro_patch4_32")
    small_data.runlocal(config)
    config.batch_size = 8
    config.epochs = 10.0
    config.data.train_limit = 32  # 4 steps per epoch
    config.multicrop.global_size = 16
    config.multicrop.local_size = 8
    config.multicrop.num_local = 2
    config.optim.warmup_epochs = 2.0
    return legacy_workdirs.with_overrides(config, changes)


def _batch(config, seed=0):
    rng = np.random.RandomState(seed)
    mc, b = config.multicrop, config.batch_size
    return {name: rng.randn(b, size, size, 3).astype(np.float32)
            for name, size in zip(view_names(mc.num_local), [mc.global_size] * 2 + [mc.local_size] * mc.num_local)}


def _jitted(config):
    setup = dino.make_setup(config, steps_per_epoch=STEPS_PER_EPOCH)
    return (setup, jax.jit(functools.partial(dino.init_state, setup=setup)),
            jax.jit(functools.partial(dino.train_step, setup=setup)))


def _leaves(tree, name):
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)
            if name in "/".join(str(k.key) for k in path)}


@pytest.fixture(scope="module")
def run():
    config = _config()
    setup, init, step = _jitted(config)
    state = init(jax.random.key(0))
    states, metrics = [state], []
    for i in range(6):
        state, m = step(state, _batch(config, i))
        states.append(state)
        metrics.append(jax.device_get(m))
    return config, setup, states, metrics


def test_the_config_s_data_gives_the_steps_per_epoch_the_tests_assume(tmp_path):
    assert dino.build_task(_config(), str(tmp_path)).length.steps_per_epoch == STEPS_PER_EPOCH


def test_teacher_is_the_ema_of_the_student_and_the_center_follows_the_teacher(run):
    config, setup, states, _ = run
    before, after = states[0], states[1]
    m = float(setup.momentum(0))
    assert m == pytest.approx(config.dino.momentum_teacher, abs=1e-7)  # the cosine starts at its base
    expected = jax.tree.map(lambda t, s: m * t + (1 - m) * s, before.teacher_params, after.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after.teacher_params, expected)
    teacher = setup.teacher
    batch = _batch(config, 0)
    teacher_out = teacher.apply({"params": before.teacher_params}, [batch["global_0"], batch["global_1"]])
    center = 0.9 * np.asarray(before.center) + 0.1 * np.asarray(teacher_out).mean(0)
    np.testing.assert_allclose(after.center, center, rtol=1e-5, atol=1e-7)


def test_logged_schedules_equal_the_official_formulas(run):
    config, _, _, metrics = run
    steps_per_epoch, epochs = 4, 10
    base_lr = config.optim.lr * config.batch_size / config.optim.lr_reference_batch
    warmup = 2 * steps_per_epoch
    lr_table = np.concatenate([np.linspace(0, base_lr, warmup), config.optim.min_lr + 0.5 * (
        base_lr - config.optim.min_lr) * (1 + np.cos(np.pi * np.arange(epochs * steps_per_epoch - warmup)
                                                     / (epochs * steps_per_epoch - warmup)))])
    total = epochs * steps_per_epoch
    wd_table = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * np.arange(total) / total))
    for step, m in enumerate(metrics):
        assert m["lr"] == pytest.approx(lr_table[step], rel=1e-5, abs=1e-12)
        assert m["weight_decay"] == pytest.approx(wd_table[step], rel=1e-5)
        assert m["teacher_temp"] == pytest.approx(0.04)


def test_last_layer_is_frozen_for_the_first_epoch_only(run):
    _, _, states, _ = run
    first = _leaves(states[0].params, "last_layer")
    assert first  # the head's weight-normalised last layer
    for step in range(1, 5):  # steps 1..4 are the first epoch (4 steps)
        for k, v in _leaves(states[step].params, "last_layer").items():
            np.testing.assert_array_equal(v, first[k])
    moved = _leaves(states[5].params, "last_layer")
    assert any(np.abs(moved[k] - first[k]).max() > 0 for k in first)
    # Meanwhile the backbone trains (from step 1: the warm-up's first lr is exactly 0, as in DINO).
    others_0, others_2 = _leaves(states[0].params, "backbone"), _leaves(states[2].params, "backbone")
    assert all(np.abs(others_2[k] - others_0[k]).max() > 0 for k in others_0)


def test_gradients_are_clipped_per_tensor():
    from vitdistill.train import optim

    grads = {"big": jnp.full((4,), 10.0), "small": jnp.full((4,), 0.1)}
    clipped, _ = optim.clip_by_tensor_norm(3.0).update(grads, None)
    assert float(jnp.linalg.norm(clipped["big"])) == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_array_equal(clipped["small"], grads["small"])  # untouched, unlike global-norm clipping


def test_a_bfloat16_step_runs_and_keeps_float32_params():
    config = _config(**{"model.dtype": "bfloat16"})
    _, init, step = _jitted(config)
    state = init(jax.random.key(0))
    state, metrics = step(state, _batch(config))
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    loss_value = float(metrics["loss"])
    assert 0 < loss_value < 2 * np.log(config.model.out_dim)


def test_the_task_judges_the_teacher_once_its_warm_ups_are_over(tmp_path):
    """The loop's check is diagnostics.DinoHealth (its rules: tests/test_diagnostics.py), started after the
    longest of the lr warm-up, the teacher temperature's warm-up (only when it changes the temperature)
    and 10% of the run, sized to the head and the global batch."""
    config = _config(max_steps=0)  # 10 epochs of 4 steps: 40 steps, a 2-epoch (8-step) lr warm-up
    check = dino.build_task(config, str(tmp_path / "a")).check_metrics
    assert (check.start_step, check.out_dim, check.global_batch) == (8, config.model.out_dim, 8)
    config = _config(max_steps=0, **{"dino.warmup_teacher_temp": 0.02, "dino.warmup_teacher_temp_epochs": 3.0})
    assert dino.build_task(config, str(tmp_path / "b")).check_metrics.start_step == 12
    config = _config(max_steps=0, **{"optim.warmup_epochs": 0.0})
    assert dino.build_task(config, str(tmp_path / "c")).check_metrics.start_step == 4


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_bfloat16_heads_give_float32_logits_accumulated_in_float32(norm_last_layer):
    """The last layer's product runs in bfloat16 but its [B, K] logits, which the loss divides by a teacher
    temperature of 0.04, are float32 (not rounded to bfloat16's 8 bits): x_bf16 @ v_bf16 summed in float32,
    times the weight-norm scale of the float32 v."""
    from vitdistill.models.dino import WeightNormLinear

    layer = WeightNormLinear(64, fixed_gain=norm_last_layer, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (8, 32), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    out = layer.apply({"params": params}, x)
    assert out.dtype == jnp.float32
    v = np.asarray(params["weight_v"], np.float64)
    x16 = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    v16 = np.asarray(jnp.asarray(params["weight_v"]).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = (x16 @ v16) / np.linalg.norm(v, axis=0, keepdims=True)
    if not norm_last_layer:
        want = want * np.asarray(params["weight_g"], np.float64)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-5, atol=1e-6)


def test_the_knn_during_training_extracts_float32_features_from_a_bfloat16_run(monkeypatch):
    from vitdistill.evaluate import batched

    seen = {}
    real = batched.cls_features

    def spy(backbone, **kwargs):
        seen["dtype"] = backbone.dtype
        return real(backbone, **kwargs)

    monkeypatch.setattr(batched, "cls_features", spy)
    dino.knn_evaluator(_config(**{"model.dtype": "bfloat16"}), mesh=None)
    assert seen["dtype"] == jnp.float32
