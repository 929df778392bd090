"""AdamW against torch.optim.AdamW, DINO's per-tensor clipping, and the decay masks."""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitdistill.train import optim

# conftest imports TensorFlow, which loads its LLVM with RTLD_GLOBAL; triton's libtriton then
# segfaults when torch.optim imports it through torch._dynamo. CPU tests never need it.
sys.modules.setdefault("triton", None)

SHAPES = {
    "patch_embed": {"proj": {"kernel": (2, 2, 3, 4), "bias": (4,)}},
    "cls_token": (1, 1, 4),
    "pos_embed": (1, 5, 4),
    "blocks_0": {"norm1": {"scale": (4,), "bias": (4,)}, "attn": {"qkv": {"kernel": (4, 12), "bias": (12,)}}},
    "head": {"kernel": (4, 6), "bias": (6,)},
    "last_layer": {"weight_v": (6, 8), "weight_g": (1, 8)},
}


def make_tree(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def leaves_with_names(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(key.key for key in path), leaf) for path, leaf in flat]


def test_masks_on_a_vit_like_tree():
    params = make_tree()
    deit = dict(leaves_with_names(optim.deit_decay_mask(params)))
    dino = dict(leaves_with_names(optim.dino_decay_mask(params)))
    last = dict(leaves_with_names(optim.last_layer_mask(params)))
    assert deit == {
        "patch_embed/proj/kernel": True, "patch_embed/proj/bias": False, "cls_token": False,
        "pos_embed": False, "blocks_0/norm1/scale": False, "blocks_0/norm1/bias": False,
        "blocks_0/attn/qkv/kernel": True, "blocks_0/attn/qkv/bias": False, "head/kernel": True,
        "head/bias": False, "last_layer/weight_v": True, "last_layer/weight_g": True,
    }
    # DINO decays the tokens and the position embedding, and the [1, K] weight-norm gain.
    assert dino == {**deit, "cls_token": True, "pos_embed": True}
    selected = {name for name, chosen in last.items() if chosen}
    assert selected == {"last_layer/weight_v", "last_layer/weight_g"}
    assert optim.deit_decay_mask({"dist_token": np.zeros((1, 1, 4))})["dist_token"]  # as DeiT: decayed
    # The train step builds masks from jax.eval_shape's shapes as well.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert optim.dino_decay_mask(shapes) == optim.dino_decay_mask(params)
    assert optim.deit_decay_mask(shapes) == optim.deit_decay_mask(params)


def to_torch(torch, tree):
    return {name: torch.nn.Parameter(torch.tensor(np.array(leaf))) for name, leaf in leaves_with_names(tree)}


@pytest.mark.parametrize("recipe", ["dino", "deit"])
def test_adamw_matches_torch(recipe):
    """Five steps with changing lr and weight decay; last_layer has grad None (torch) / is
    frozen (ours) for the first two, so its bias correction restarts at step 3."""
    torch = pytest.importorskip("torch")
    num_steps, frozen_steps = 5, 2
    lrs = [1e-2, 3e-2, 2e-2, 1e-2, 5e-3]
    wds = [0.04, 0.1, 0.2, 0.3, 0.4] if recipe == "dino" else [0.05] * num_steps
    mask_fn = optim.dino_decay_mask if recipe == "dino" else optim.deit_decay_mask
    params = make_tree(0)
    grads = [make_tree(seed) for seed in range(1, num_steps + 1)]

    torch_params = to_torch(torch, params)
    decay = dict(leaves_with_names(mask_fn(params)))
    optimizer = torch.optim.AdamW([  # get_params_groups / timm's param groups
        {"params": [p for n, p in torch_params.items() if decay[n]]},
        {"params": [p for n, p in torch_params.items() if not decay[n]], "weight_decay": 0.0},
    ], eps=1e-8, betas=(0.9, 0.999))

    frozen = optim.frozen_while(optim.last_layer_mask(params), frozen_steps)
    tx = optim.adamw(lambda step: jnp.asarray(lrs)[step], weight_decay=lambda step: jnp.asarray(wds)[step],
                     decay_mask=mask_fn, frozen=frozen)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(num_steps):
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lrs[step]
            if i == 0:  # as DINO's loop: only the first group is regularised
                group["weight_decay"] = wds[step]
        for name, grad in leaves_with_names(grads[step]):
            frozen_now = name.startswith("last_layer") and step < frozen_steps
            torch_params[name].grad = None if frozen_now else torch.tensor(np.array(grad))
        optimizer.step()

        updates, state = update(grads[step], state, params)
        params = optax.apply_updates(params, updates)
        for name, leaf in leaves_with_names(params):
            # Params are O(1): 1e-6 is a few float32 ulps.
            np.testing.assert_allclose(leaf, torch_params[name].detach().numpy(), atol=1e-6, rtol=1e-6,
                                       err_msg=f"{name} after step {step}")
    steps = dict(leaves_with_names(state.leaf_steps))
    assert steps["last_layer/weight_v"] == num_steps - frozen_steps
    assert steps["head/kernel"] == num_steps
    assert optimizer.state[torch_params["last_layer/weight_v"]]["step"] == num_steps - frozen_steps


def test_frozen_leaves_do_not_move_and_bias_correction_restarts():
    params = make_tree(0)
    grads = make_tree(1)
    frozen = optim.frozen_while(optim.last_layer_mask(params), 1)
    tx = optim.adamw(1e-2, weight_decay=0.5, decay_mask=optim.dino_decay_mask, frozen=frozen)
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update(grads, state, params)
    np.testing.assert_array_equal(updates["last_layer"]["weight_v"], 0.0)  # no Adam step, no decay
    np.testing.assert_array_equal(state.mu["last_layer"]["weight_v"], 0.0)
    assert np.abs(updates["head"]["kernel"]).max() > 0
    updates, state = update(grads, state, params)
    # First real step: bias-corrected Adam moves each weight by lr·sign(g), plus the decay.
    want = -1e-2 * np.sign(grads["last_layer"]["weight_v"]) - 1e-2 * 0.5 * params["last_layer"]["weight_v"]
    # Had the frozen step counted, the Adam term would be about 25% smaller.
    np.testing.assert_allclose(updates["last_layer"]["weight_v"], want, atol=2e-7)


def test_adamw_state_is_a_plain_checkpointable_pytree(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = make_tree(0)
    tx = optax.chain(optim.clip_by_tensor_norm(3.0),
                     optim.adamw(1e-3, weight_decay=0.04, decay_mask=optim.dino_decay_mask))
    state = tx.init(params)
    _, state = tx.update(make_tree(1), state, params)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "opt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    jax.tree.map(np.testing.assert_array_equal, restored, state)


def dino_clip_gradients(torch, named_params, clip):
    """facebookresearch/dino utils.clip_gradients."""
    norms = []
    for _, p in named_params.items():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def test_clip_by_tensor_norm_matches_dino():
    torch = pytest.importorskip("torch")
    grads = make_tree(3)
    grads = jax.tree.map(lambda g: g * 0.1, grads)
    grads["blocks_0"]["attn"]["qkv"]["kernel"] *= 100.0  # far above the threshold
    grads["head"]["kernel"] *= 2.0  # norm ~1: below it
    torch_params = to_torch(torch, grads)
    for p in torch_params.values():
        p.grad = p.detach().clone()
    norms = dino_clip_gradients(torch, torch_params, 3.0)
    assert max(norms) > 3.0 > min(norms)

    clip = optim.clip_by_tensor_norm(3.0)
    clipped, _ = jax.jit(clip.update)(grads, clip.init(grads))
    for name, leaf in leaves_with_names(clipped):
        np.testing.assert_allclose(leaf, torch_params[name].grad.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.linalg.norm(leaf) <= 3.0 + 1e-5
    np.testing.assert_array_equal(clipped["head"]["kernel"], grads["head"]["kernel"])  # untouched

    global_clip = optax.clip_by_global_norm(3.0)
    globally, _ = global_clip.update(grads, global_clip.init(grads))
    assert not np.allclose(globally["head"]["kernel"], clipped["head"]["kernel"])


def test_tree_l2_norm():
    tree = make_tree(4)
    want = np.sqrt(sum(np.sum(np.square(leaf, dtype=np.float64)) for leaf in jax.tree.leaves(tree)))
    assert float(jax.jit(optim.tree_l2_norm)(tree)) == pytest.approx(want, rel=1e-6)
    assert float(optim.tree_l2_norm({})) == 0.0


def test_deit_decay_mask_is_timm_0_3_2s_add_weight_decay_on_a_distilled_deit():
    """timm 0.3.2 (DeiT's pin) `optim/optim_factory.py::add_weight_decay(model, wd, model.no_weight_decay())`:
    no decay for 1-D params, names ending '.bias' and names in {'pos_embed', 'cls_token'} (the
    `no_weight_decay` DeiT's DistilledVisionTransformer inherits), written out on the torch names."""
    from vitdistill import models
    from vitdistill.convert import torch_key

    model = models.create("deit_micro_distilled_patch4_32")
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    ours = optim.deit_decay_mask(params)
    checked = 0
    for path, decays in jax.tree_util.tree_flatten_with_path(ours)[0]:
        keys = tuple(entry.key for entry in path)
        leaf = functools.reduce(lambda tree, key: tree[key], keys, params)
        name = torch_key(("params",) + keys)
        official_no_decay = len(leaf.shape) == 1 or name.endswith(".bias") or name in {"pos_embed", "cls_token"}
        assert decays == (not official_no_decay), name
        checked += 1
    assert checked == len(jax.tree.leaves(params))
    flat = dict(leaves_with_names(ours))
    assert flat["dist_token"] and not flat["cls_token"] and not flat["pos_embed"]
