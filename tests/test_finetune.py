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
