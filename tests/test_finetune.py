"""Fine-tuning a converted DeiT at a new resolution, as DeiT's `main.py --finetune` does: every weight of the
checkpoint is restored, the position embedding is resampled with `F.interpolate(mode='bicubic',
align_corners=False)` over the patch grid (the class and distillation tokens' rows kept), and only the heads,
whose class count changes, are new; the log line names them. The reference resampling below is main.py's
code written out in torch, not ours.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_convert import needs_torch, run_convert, torch_layout
from vitdistill import models, recipes, small_data
from vitdistill.methods import deit
from vitdistill.train import loop, sharding

try:
    import torch
except ImportError:
    torch = None

SOURCE = "deit_micro_distilled_patch4_32"  # 32 px, patch 4: an 8 x 8 grid, cls + dist tokens


def _official_resample(pos_embed: np.ndarray, num_patches: int, num_extra_tokens: int) -> np.ndarray:
    """facebookresearch/deit main.py, the `--finetune` branch."""
    pos_embed_checkpoint = torch.from_numpy(pos_embed)
    embedding_size = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(pos_tokens, size=(new_size, new_size), mode='bicubic',
                                                 align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1).numpy()


@needs_torch
def test_fine_tuning_a_converted_deit_at_a_new_resolution_restores_every_weight_and_names_the_new_heads(
        tmp_path, capsys):
    # The source: an official-layout checkpoint with a 5-class head, trained "at 32 px".
    source = models.create(SOURCE, num_classes=5)
    variables = jax.jit(source.init)(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))
    state_dict = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in torch_layout(variables).items()}
    torch.save({"model": state_dict}, tmp_path / "deit.pth")
    run_convert(f"--checkpoint={tmp_path / 'deit.pth'}", f"--model={SOURCE}", f"--output={tmp_path / 'converted'}")

    # The fine-tune: digits (10 classes) at 48 px, a 12 x 12 grid, without distillation (main.py's rule).
    config = recipes.deit(SOURCE, distilled=True)
    small_data.runlocal(config)
    config.data.image_size = 48
    config.distill.kind = "none"
    config.model.init_from = str(tmp_path / "converted")
    config.batch_size = 8
    config.model_ema_decay = 0.99996  # DeiT's default model EMA (runlocal turns it off)
    task = deit.build_task(config, str(tmp_path / "run"))
    mesh = sharding.make_mesh()
    _, shardings = loop.state_layout(task, mesh, config.seed)
    fresh = loop.init_state(task, shardings, config.seed)
    fresh_params = jax.tree.map(np.asarray, sharding.to_host(fresh.params))
    state = task.prepare_state(fresh)
    params = jax.tree.map(np.asarray, sharding.to_host(state.params))

    flat_source = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(variables["params"]))[0])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    flat_fresh = dict(jax.tree_util.tree_flatten_with_path(fresh_params)[0])
    assert set(flat_params) == set(flat_source)
    new, restored = [], 0
    for path, value in flat_params.items():
        name = "/".join(entry.key for entry in path)
        if name == "pos_embed":
            assert value.shape == (1, 2 + 12 * 12, 128)
            np.testing.assert_allclose(value, _official_resample(np.asarray(flat_source[path]), 144, 2),
                                       rtol=0, atol=1e-5)
        elif name.split("/")[0] in ("head", "head_dist"):
            assert flat_source[path].shape[-1] == 5 and value.shape[-1] == 10
            np.testing.assert_array_equal(value, flat_fresh[path])  # new: the fresh init is kept
            new.append(name)
        else:
            np.testing.assert_array_equal(value, np.asarray(flat_source[path]), err_msg=name)
            restored += 1
    assert sorted(new) == ["head/bias", "head/kernel", "head_dist/bias", "head_dist/kernel"]
    assert restored == len(flat_source) - 5
    out = capsys.readouterr().out
    assert (f"init_from: the converted checkpoint {tmp_path / 'converted'}: {restored} arrays loaded, resampled to "
            "this model's grid: pos_embed;") in out
    assert "new (fresh init): head/bias, head/kernel, head_dist/bias, head_dist/kernel" in out
    assert state.ema_params  # DeiT's model EMA starts from the fine-tuned weights too
    ema = jax.tree.map(np.asarray, sharding.to_host(state.ema_params))
    jax.tree.map(np.testing.assert_array_equal, ema, params)


def test_a_checkpoint_of_another_width_is_refused_naming_the_clash(tmp_path):
    from vitdistill import weights
    from vitdistill.errors import CheckpointError

    other = models.create("deit_micro_patch4_32")
    variables = jax.jit(other.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    narrow = jax.tree.map(lambda x: x[..., :64] if x.shape[-1] == 128 else x, variables)
    weights.save_variables(str(tmp_path / "narrow"), narrow, model="deit_micro_patch4_32")
    with pytest.raises(CheckpointError, match=r"(?s)do not fit this model.*pretrained \[.*64\], model \[.*128\]"):
        weights.load_pretrained(str(tmp_path / "narrow"), variables)


def _finetune_config(name: str, arg=None):
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return recipes.from_file(os.path.join(root, "configs", name), arg)


def _micro_finetune_step(config, *, seed: int):
    """One DeiT step of the micro distilled model under `config`'s mode, drop path 0.5, smoothing alone (no
    mixup, so the targets are known): (loss, state before, state after, images, targets)."""
    from vitdistill.train.schedules import RunLength
    config.model.name = SOURCE
    config.data.image_size = 32
    config.model.drop_path_rate = 0.5
    config.mixup.prob = 0.0
    config.seed = seed
    setup = deit.make_setup(config, num_classes=10, length=RunLength(steps_per_epoch=10, total_steps=300))
    state = deit.init_state(jax.random.key(0), setup=setup)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float32)
    labels = jnp.array([0, 3, 7, 9], jnp.int32)
    new_state, metrics = jax.jit(lambda s, b: deit.train_step(s, b, {}, setup=setup))(
        state, {"image": images, "label": labels})
    targets = 0.9 * jax.nn.one_hot(labels, 10) + 0.1 / 10
    return float(metrics["loss"]), setup, state, new_state, images, targets


def test_deit_fine_tuning_trains_in_inference_mode_as_main_py_finetune():
    """DeiT's main.py fine-tunes with the model in eval mode (the paper's code, a8e9096..ab57153:
    `train_one_epoch(..., set_training_mode=args.finetune == '')`, "keep in eval mode during finetuning"; today's
    with --no-train-mode): timm's DropPath is the identity and DistilledVisionTransformer returns
    (x + x_dist) / 2, on which the criterion runs, so both heads train. Written out below: the smoothed
    cross-entropy of the mean of the two heads' logits, without drop path."""
    config = _finetune_config("deit_b_distilled_384.py")
    assert config.model.train_mode is False and config.distill.kind == "none"
    assert _finetune_config("deit_b_384.py").model.train_mode is False
    loss, setup, state, new_state, images, targets = _micro_finetune_step(config, seed=0)
    cls, dist = setup.model.apply({"params": state.params}, images, train=False, both_heads=True)
    logits = (np.asarray(cls, np.float64) + np.asarray(dist, np.float64)) / 2
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    want = float(np.mean(-(np.asarray(targets) * log_p).sum(-1)))
    assert loss == pytest.approx(want, rel=1e-5)
    # No drop path: another seed (other drop-path draws in training mode) gives the same loss.
    assert _micro_finetune_step(_finetune_config("deit_b_distilled_384.py"), seed=5)[0] == pytest.approx(loss, rel=1e-6)
    # Both heads train: the distillation head moves by Adam's step, not only by the 1e-8 weight decay.
    moved = np.abs(np.asarray(new_state.params["head_dist"]["kernel"] - state.params["head_dist"]["kernel"]))
    assert moved.max() > 1e-8
    # In training mode (pre-training, or `:distill`) the class head alone takes this loss, under drop path.
    train_config = _finetune_config("deit_b_distilled_384.py")
    train_config.model.train_mode = True
    assert abs(_micro_finetune_step(train_config, seed=0)[0] - want) > 1e-3


def test_distillation_needs_training_mode_and_the_distill_fine_tune_has_it():
    from vitdistill.errors import ConfigError
    config = _finetune_config("deit_b_distilled_384.py")
    config.distill.kind = "hard"
    with pytest.raises(ConfigError, match=r"train_mode=False.*mean of its heads.*--config.model.train_mode=True"):
        deit.check_distillation(config)
    distill = _finetune_config("deit_b_distilled_384.py", "distill")
    assert distill.distill.kind == "hard" and distill.model.train_mode is True
    deit.check_distillation(distill)
