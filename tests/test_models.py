"""Model behaviour that needs no PyTorch: names, parameter counts, resampling, attention, drop path, heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitdistill.models import MODELS, adapt_params, create, create_dino, last_attention, resample_pos_embed
from vitdistill.errors import ConfigError
from vitdistill.models.vit import drop_path_rates

# timm 1.0's `sum(p.numel() for p in model.parameters())` for the same names (checked
# against timm in test_models_parity.py); the micro variants are ours.
PARAM_COUNTS = {
    'deit_tiny_patch16_224': 5_717_416,
    'deit_small_patch16_224': 22_050_664,
    'deit_base_patch16_224': 86_567_656,
    'deit_base_patch16_384': 86_859_496,
    'deit_tiny_distilled_patch16_224': 5_910_800,
    'deit_small_distilled_patch16_224': 22_436_432,
    'deit_base_distilled_patch16_224': 87_338_192,
    'deit_base_distilled_patch16_384': 87_630_032,
    'vit_small_patch16_224': 21_665_664,
    'vit_small_patch8_224': 21_670_272,
    'vit_base_patch16_224': 85_798_656,
    'vit_base_patch8_224': 85_807_872,
    'resnet18': 11_689_512,
    'resnet50': 25_557_032,
    'regnety_160': 83_590_140,
    'deit_micro_patch4_32': 809_354,
    'deit_micro_distilled_patch4_32': 810_900,
    'vit_micro_patch4_32': 808_064,
    'resnet_micro': 1_228_970,
}


def param_shapes(model, size):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']


def test_every_model_has_a_parameter_count():
    assert set(PARAM_COUNTS) == set(MODELS)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_parameter_count(name):
    model = create(name)
    size = getattr(model, 'img_size', 64)
    assert sum(x.size for x in jax.tree.leaves(param_shapes(model, size))) == PARAM_COUNTS[name]


def test_create_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match=r"unknown model 'deit_huge'.*deit_small_patch16_224"):
        create('deit_huge')
    with pytest.raises(ValueError, match=r"'drop_path'.*valid fields: .*drop_path_rate"):
        create('deit_micro_patch4_32', drop_path=0.1)


def test_overrides_apply_to_every_vit():
    model = create('deit_small_patch16_224', img_size=32, patch_size=8, num_classes=7, drop_path_rate=0.1,
                   dtype=jnp.bfloat16)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert variables['params']['pos_embed'].shape == (1, 17, 384)
    assert variables['params']['pos_embed'].dtype == jnp.float32  # params stay float32
    logits = jax.jit(model.apply)(variables, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 7) and logits.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Position-embedding resampling.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('antialias', [False, True])
def test_resample_is_identity_on_the_same_grid(antialias):
    pos_embed = jax.random.normal(jax.random.key(0), (1, 2 + 7 * 7, 16))
    np.testing.assert_array_equal(resample_pos_embed(pos_embed, (7, 7), 2, antialias=antialias), pos_embed)


def test_resample_matches_hand_computed_pytorch_bicubic():
    # Columns 1, 2, 4, 8 upsampled 4 -> 8 with PyTorch's a = -0.75 and clamped borders:
    # out[0] = 1.10546875*1 - 0.10546875*2, out[1] = 0.7734375*1 + 0.26171875*2 - 0.03515625*4,
    # out[7] = -0.10546875*4 + 1.10546875*8. Rows stay on the same 4-point grid (identity).
    row = jnp.array([1.0, 2.0, 4.0, 8.0])
    grid = jnp.broadcast_to(row, (4, 4)).reshape(1, 16, 1)
    cls = jnp.full((1, 1, 1), 42.0)
    out = resample_pos_embed(jnp.concatenate([cls, grid], axis=1), (4, 8), 1)
    assert out.shape == (1, 33, 1)
    assert out[0, 0, 0] == 42.0
    columns = np.asarray(out[0, 1:, 0]).reshape(4, 8)
    np.testing.assert_allclose(columns[:, 0], 0.89453125, rtol=1e-6)
    np.testing.assert_allclose(columns[:, 1], 1.15625, rtol=1e-6)
    np.testing.assert_allclose(columns[:, 7], 8.421875, rtol=1e-6)


def test_model_runs_at_other_sizes():
    model = create('vit_micro_patch4_32')
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    for size in (16, 28, 48):
        assert jax.jit(model.apply)(variables, jnp.zeros((1, size, size, 3))).shape == (1, 128)
    with pytest.raises(ValueError, match='multiple of the patch size 4'):
        model.apply(variables, jnp.zeros((1, 30, 30, 3)))


# ---------------------------------------------------------------------------
# Attention maps, drop path, distillation heads.
# ---------------------------------------------------------------------------


def test_sowed_attention_rows_sum_to_one():
    model = create('vit_micro_patch4_32')
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    attention = last_attention(model, variables, images)
    assert attention.shape == (2, 4, 65, 65)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    _, state = model.apply(variables, images, mutable=['intermediates'])
    assert len(state['intermediates']) == 4
    assert state['intermediates']['blocks_3']['tokens'][0].shape == (2, 65, 128)


def test_drop_path_rates_rise_linearly():
    np.testing.assert_allclose(drop_path_rates(0.1, 12), np.arange(12) * 0.1 / 11)
    assert drop_path_rates(0.0, 3) == [0.0, 0.0, 0.0]


def test_drop_path_only_in_train_mode_per_sample_and_per_block():
    # Rates over 3 blocks: 0, 0.5, 1. Block 2 always drops both branches (output == input);
    # block 1 drops both for about a quarter of the samples; block 0 never drops.
    model = create('vit_micro_patch4_32', img_size=8, depth=3, drop_path_rate=1.0)
    images = jax.random.normal(jax.random.key(1), (256, 8, 8, 3))
    variables = model.init(jax.random.key(0), images)

    def tokens(train, seed=0):
        _, state = model.apply(variables, images, train=train, rngs={'dropout': jax.random.key(seed)},
                               mutable=['intermediates'])
        return [np.asarray(state['intermediates'][f'blocks_{i}']['tokens'][0]) for i in range(3)]

    evaluation, train, other_train = tokens(False), tokens(True), tokens(True, seed=1)
    np.testing.assert_array_equal(model.apply(variables, images), model.apply(variables, images))
    np.testing.assert_array_equal(train[0], evaluation[0])
    np.testing.assert_array_equal(train[2], train[1])
    unchanged = np.all(train[1] == train[0], axis=(1, 2)).mean()
    assert 0.15 < unchanged < 0.35, unchanged
    assert not np.array_equal(train[1], other_train[1])
    assert not np.array_equal(evaluation[2], evaluation[1])


def test_distilled_heads():
    model = create('deit_micro_distilled_patch4_32')
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    cls_logits, dist_logits = model.apply(variables, images, both_heads=True)
    assert cls_logits.shape == dist_logits.shape == (2, 10)
    mean = model.apply(variables, images)
    np.testing.assert_allclose(mean, (cls_logits + dist_logits) / 2, rtol=1e-6)
    assert isinstance(model.apply(variables, images, train=True), tuple)  # both_heads defaults to train
    np.testing.assert_allclose(model.apply(variables, images, train=True, both_heads=False), mean, rtol=1e-6)
    # A model without a distillation token ignores both_heads.
    plain = create('deit_micro_patch4_32')
    plain_vars = plain.init(jax.random.key(0), images)
    assert plain.apply(plain_vars, images, train=True).shape == (2, 10)


def test_backbone_returns_cls_feature():
    model = create('vit_micro_patch4_32')
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    assert 'head' not in variables['params']
    features = model.apply(variables, images)
    assert features.shape == (2, 128)


# ---------------------------------------------------------------------------
# DINO head and multi-crop wrapper.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('norm_last_layer', [True, False])
def test_dino_head_parameters(norm_last_layer):
    model = create_dino('vit_micro_patch4_32', out_dim=64, hidden_dim=32, bottleneck_dim=16,
                        norm_last_layer=norm_last_layer)
    params = jax.eval_shape(model.init, jax.random.key(0), [jnp.zeros((1, 32, 32, 3))])['params']
    assert set(params) == {'backbone', 'head'}
    head = params['head']
    assert set(head) == {'mlp_0', 'mlp_2', 'mlp_4', 'last_layer'}
    assert head['mlp_0']['kernel'].shape == (128, 32)
    assert head['last_layer']['weight_v'].shape == (16, 64)
    assert ('weight_g' in head['last_layer']) == (not norm_last_layer)
    if not norm_last_layer:
        assert head['last_layer']['weight_g'].shape == (1, 64)


def test_dino_runs_backbone_once_per_resolution_group_in_crop_order():
    model = create_dino('vit_micro_patch4_32', out_dim=64, hidden_dim=32, bottleneck_dim=16)
    keys = jax.random.split(jax.random.key(1), 5)
    crops = [jax.random.normal(keys[0], (2, 32, 32, 3)), jax.random.normal(keys[1], (2, 32, 32, 3)),
             jax.random.normal(keys[2], (2, 16, 16, 3)), jax.random.normal(keys[3], (2, 16, 16, 3)),
             jax.random.normal(keys[4], (2, 32, 32, 3))]
    variables = jax.jit(model.init)(jax.random.key(0), crops[:1])
    out, state = jax.jit(lambda v, c: model.apply(v, c, mutable=['intermediates']))(variables, crops)
    assert out.shape == (10, 64)
    assert len(state['intermediates']['backbone']['blocks_0']['tokens']) == 3  # groups: 32, 16, 32 px

    backbone = {'params': variables['params']['backbone']}
    features = jnp.concatenate([jax.jit(model.backbone.apply)(backbone, crop) for crop in crops])
    expected = model.head.apply({'params': variables['params']['head']}, features)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # With the gain fixed at 1 the outputs are cosine similarities.
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5


# ---------------------------------------------------------------------------
# Fine-tuning from pretrained params.
# ---------------------------------------------------------------------------


def random_params(model, inputs, seed):
    """Params of the model's shapes, filled with distinct random numbers (no init cost)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)['params']
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_adapt_params_resamples_pos_embed_and_keeps_a_fresh_head():
    pretrained = random_params(create('deit_micro_distilled_patch4_32'), jnp.zeros((1, 32, 32, 3)), seed=0)
    fresh = random_params(create('deit_micro_distilled_patch4_32', img_size=48, num_classes=7),
                          jnp.zeros((1, 48, 48, 3)), seed=1)
    adapted = adapt_params(pretrained, fresh)
    assert jax.tree.structure(adapted) == jax.tree.structure(fresh)
    np.testing.assert_allclose(adapted['pos_embed'], resample_pos_embed(pretrained['pos_embed'], (12, 12), 2),
                               atol=1e-6)
    np.testing.assert_array_equal(adapted['head']['kernel'], fresh['head']['kernel'])
    np.testing.assert_array_equal(adapted['head_dist']['bias'], fresh['head_dist']['bias'])
    np.testing.assert_array_equal(adapted['blocks_3']['mlp']['fc2']['kernel'],
                                  pretrained['blocks_3']['mlp']['fc2']['kernel'])


def test_adapt_params_moves_a_backbone_into_and_out_of_dino():
    backbone = random_params(create('vit_micro_patch4_32'), jnp.zeros((1, 32, 32, 3)), seed=0)
    dino = random_params(create_dino('vit_micro_patch4_32', out_dim=64, hidden_dim=32, bottleneck_dim=16),
                         [jnp.zeros((1, 32, 32, 3))], seed=1)
    into = adapt_params(backbone, dino)
    jax.tree.map(np.testing.assert_array_equal, into['backbone'], backbone)
    jax.tree.map(np.testing.assert_array_equal, into['head'], dino['head'])
    jax.tree.map(np.testing.assert_array_equal, adapt_params(dino, backbone), dino['backbone'])


def test_adapt_params_rejects_another_architecture():
    pretrained = random_params(create('deit_micro_patch4_32', embed_dim=64), jnp.zeros((1, 32, 32, 3)), seed=0)
    fresh = random_params(create('deit_micro_patch4_32'), jnp.zeros((1, 32, 32, 3)), seed=1)
    with pytest.raises(ValueError, match=r'blocks_0/attn/qkv/kernel: pretrained \[64, 192\], model \[128, 384\]'):
        adapt_params(pretrained, fresh)


def test_unknown_pos_embed_interpolation_is_a_config_error():
    with pytest.raises(ConfigError, match="pos_embed_interpolation='nearest'; valid: antialias, bicubic, dino"):
        create_dino('vit_micro_patch4_32', pos_embed_interpolation='nearest')
    assert create_dino('vit_micro_patch4_32').backbone.pos_embed_interpolation == 'dino'
    assert create('vit_micro_patch4_32').pos_embed_interpolation == 'dino'  # DINO's backbones resample as DINO
    assert create('deit_micro_patch4_32').pos_embed_interpolation == 'antialias'


def test_fresh_weights_follow_timms_trunc_normal_std_002():
    """timm 0.3.2 and DINO initialise Linear weights, cls/dist tokens, the position embedding and DINO's head
    with `trunc_normal_(std=.02)`, whose bounds a=-2, b=2 are absolute: in effect N(0, 0.02^2). So the values
    follow that normal (Kolmogorov-Smirnov against its CDF) and 2 (1 - Phi(2)) = 4.55 % of them lie beyond
    +-0.04. (Flax's truncated_normal(0.02) has std 0.0176 and none beyond 0.04: this test fails on it.)"""
    import scipy.stats

    model = create_dino("vit_micro_patch4_32", out_dim=512)
    params = jax.jit(lambda: model.init(jax.random.key(0), [jnp.zeros((1, 32, 32, 3))]))()["params"]
    backbone = params["backbone"]
    samples = {
        "qkv kernel": backbone["blocks_0"]["attn"]["qkv"]["kernel"],
        "fc1 kernel": backbone["blocks_3"]["mlp"]["fc1"]["kernel"],
        "pos_embed": backbone["pos_embed"],
        "DINO head mlp": params["head"]["mlp_0"]["kernel"],
    }
    for name, values in samples.items():
        values = np.asarray(values, np.float64).ravel()
        assert values.size > 8_000, name
        assert scipy.stats.kstest(values, "norm", args=(0.0, 0.02)).pvalue > 1e-3, name
        assert abs(values.std() - 0.02) < 0.02 * 0.02, (name, values.std())
        beyond = np.mean(np.abs(values) > 0.04)
        assert abs(beyond - 2 * scipy.stats.norm.sf(2.0)) < 0.01, (name, beyond)


@pytest.mark.parametrize('stride', [1, 2])
def test_grouped_conv_split_per_group_equals_one_grouped_convolution(stride):
    """RegNetY's grouped 3x3 convolutions run as one dense convolution per group on the CPU (XLA:CPU's
    feature_group_count path is 5-10x slower); outputs and gradients are those of the grouped convolution."""
    from vitdistill.models.regnet import GroupedConv, conv_init

    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 12))
    split, native = (GroupedConv(12, 3, stride, 3, conv_init(3), split=s) for s in (True, False))
    variables = split.init(jax.random.key(0), x)
    assert variables['params']['kernel'].shape == (3, 3, 4, 12)  # nn.Conv's layout: checkpoints unchanged

    def loss(module):
        return lambda params, x: jnp.sum(jnp.sin(module.apply({'params': params}, x)))

    expected = jax.lax.conv_general_dilated(x, variables['params']['kernel'], (stride, stride), [(1, 1), (1, 1)],
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=3)
    np.testing.assert_allclose(split.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(native.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    grads = [jax.grad(loss(m), argnums=(0, 1))(variables['params'], x) for m in (split, native)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the group boundaries matter: group g's outputs see only group g's inputs
    poked = x.at[..., 0].add(1.0)
    changed = np.abs(np.asarray(split.apply(variables, poked) - split.apply(variables, x))).max(axis=(0, 1, 2))
    assert (changed[:4] > 0).all() and (changed[4:] == 0).all()


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv_runs_as_a_matrix_product_with_the_convolutions_numbers(stride):
    """On the CPU a 1x1 convolution without groups (RegNetY's conv1, conv3 and strided shortcut) is one matrix
    product over the pixels it keeps; outputs and gradients are XLA's convolution's, odd sides included."""
    from vitdistill.models.regnet import GroupedConv, conv_init

    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 12))
    pointwise = GroupedConv(20, 1, stride, 1, conv_init(1), split=True)
    variables = pointwise.init(jax.random.key(0), x)
    assert variables['params']['kernel'].shape == (1, 1, 12, 20)

    def conv(params, x):
        return jax.lax.conv_general_dilated(x, params['kernel'], (stride, stride), [(0, 0), (0, 0)],
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    out = pointwise.apply(variables, x)
    assert out.shape == (2, 9 // stride + 9 % stride, 9 // stride + 9 % stride, 20)
    np.testing.assert_allclose(out, conv(variables['params'], x), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(variables['params'], x)
             for f in (lambda p, x: pointwise.apply({'params': p}, x), conv)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _loss_and_grads(model, params, images):
    def loss(params):
        out = model.apply({'params': params}, images, train=True, rngs={'dropout': jax.random.key(3)})
        return jnp.mean(jax.nn.log_softmax(out)[:, 0])

    return jax.jit(jax.value_and_grad(loss))


def test_remat_gives_the_same_loss_and_gradients_and_recomputes_the_blocks():
    """nn.remat trades compute for memory: the same numbers, and the blocks' forward runs a second time in the
    backward pass. (The memory it saves is an accelerator matter: XLA:CPU's buffer assignment gives a DeiT-S
    step at batch 4 the same 428 MiB of temporaries either way.)"""
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    plain, remat = (create('deit_micro_patch4_32', drop_path_rate=0.2, remat=r) for r in (False, True))
    params = plain.init(jax.random.key(0), images[:1])['params']
    assert jax.tree.structure(remat.init(jax.random.key(0), images[:1])['params']) == jax.tree.structure(params)
    (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_grads(m, params, images)(params) for m in (plain, remat))
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    def flops(compiled):
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

    forward = flops(jax.jit(lambda p: plain.apply({'params': p}, images, train=False)).lower(params).compile())
    extra = flops(_loss_and_grads(remat, params, images).lower(params).compile()) - flops(
        _loss_and_grads(plain, params, images).lower(params).compile())
    # every block's forward but what the backward never reads (fc2's and proj's products): measured 0.69
    assert 0.5 * forward < extra <= forward, (extra, forward)


def test_scanned_blocks_give_the_loop_s_outputs_and_gradients_from_the_same_parameters():
    """`scan_blocks` keeps the per-block parameter layout and, without drop path, computes what the loop
    computes: outputs (eval and train) and gradients, with remat too. With drop path it still draws: the
    loss moves with the key."""
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    plain = create('deit_micro_patch4_32')
    params = plain.init(jax.random.key(0), images[:1])['params']
    for scanned in (create('deit_micro_patch4_32', scan_blocks=True),
                    create('deit_micro_patch4_32', scan_blocks=True, remat=True)):
        assert jax.tree.structure(scanned.init(jax.random.key(0), images[:1])['params']) == jax.tree.structure(params)
        np.testing.assert_allclose(scanned.apply({'params': params}, images), plain.apply({'params': params}, images),
                                   rtol=1e-5, atol=1e-6)
        (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_grads(m, params, images)(params) for m in (plain, scanned))
        np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    dropping = create('deit_micro_patch4_32', scan_blocks=True, drop_path_rate=0.5)

    def loss(key):
        out = dropping.apply({'params': params}, images, train=True, rngs={'dropout': key})
        return float(jnp.mean(jax.nn.log_softmax(out)[:, 0]))

    assert loss(jax.random.key(3)) == loss(jax.random.key(3)) != loss(jax.random.key(4))


@pytest.mark.parametrize('rate', [0.0, 0.3])
def test_drop_path_with_a_traced_rate_draws_as_with_a_fixed_one(rate):
    """The scanned blocks pass each block's drop-path rate as an array: same mask and scaling as the float
    rate for the same key (DeiT's timm 0.3.2 drop_path: keep with probability 1 - rate, divide by it)."""
    from vitdistill.models.vit import DropPath

    x = jax.random.normal(jax.random.key(0), (64, 5, 8))
    rngs = {'dropout': jax.random.key(7)}
    fixed = DropPath(rate).apply({}, x, train=True, rngs=rngs)
    traced = jax.jit(lambda r: DropPath(r).apply({}, x, train=True, rngs=rngs))(jnp.float32(rate))
    np.testing.assert_allclose(traced, fixed, rtol=1e-6)
    kept = np.asarray(jnp.any(fixed != 0, axis=(1, 2)))
    np.testing.assert_allclose(np.asarray(fixed)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    assert (kept.mean() == 1.0) if rate == 0 else (0.5 < kept.mean() < 0.9)


def test_fused_attention_kernel_equals_the_explicit_attention(monkeypatch):
    """Where a fused kernel runs (cuDNN on GPUs), the outputs and gradients are the explicit attention's; here
    XLA's own implementation of jax.nn.dot_product_attention stands in for cuDNN, which the CPU lacks."""
    import vitdistill.models.vit as vit

    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    model = create('deit_micro_patch4_32')
    params = model.init(jax.random.key(0), images[:1])['params']
    explicit = _loss_and_grads(model, params, images)(params)
    calls = []
    monkeypatch.setattr(vit, 'fused_attention_kernel', lambda dtype: calls.append(dtype) or 'xla')
    fused = _loss_and_grads(model, params, images)(params)
    assert calls  # the fused path ran
    for a, b in zip(jax.tree.leaves(explicit), jax.tree.leaves(fused)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # collecting the weights (attention maps) always takes the explicit path
    assert last_attention(model, {'params': params}, images).shape == (2, model.num_heads, 65, 65)
