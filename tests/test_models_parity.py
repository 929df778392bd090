"""Parity with the PyTorch reference models: timm 1.0 for every named model, and a DINO head
written in the official layout (facebookresearch/dino `DINOHead` and `MultiCropWrapper`).

Random weights, batch 2, eval mode, float32 on the CPU (where XLA's float32 matmuls are full
precision, so no `jax_default_matmul_precision` setting is needed). Target: max |Δ| <= 1e-4,
scaled by the output magnitude when it exceeds 1 (the CNNs, after randomising BatchNorm).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason="torch is not installed (pip install -e '.[torch]')")
timm = pytest.importorskip('timm', reason="timm is not installed (pip install -e '.[torch]')")
F = torch.nn.functional

from vitdistill.convert import from_torch  # noqa: E402
from vitdistill.models import MODELS, create, create_dino, resample_pos_embed  # noqa: E402

TIMM_NAMES = [name for name in MODELS if 'micro' not in name]
# Non-native input sizes: DeiT against timm's `dynamic_img_size=True` resampling; DINO's vit_* backbones against
# DINO's own forward (`official_dino_forward`, its interpolate_pos_encoding) on the same timm modules.
OTHER_SIZES = {
    'vit_small_patch16_224': [96], 'vit_small_patch8_224': [96],
    'vit_base_patch16_224': [96], 'vit_base_patch8_224': [96],
    'deit_tiny_patch16_224': [384], 'deit_tiny_distilled_patch16_224': [384],
}


def nhwc(images):
    return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


def check_close(actual, expected, what):
    """Asserts max |Δ| <= 1e-4 * max(1, output scale); prints the error for the report."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    error, scale = float(np.abs(actual - expected).max()), float(np.abs(expected).max())
    print(f'{what}: max abs error {error:.2e} (output scale {scale:.3g})')
    assert error <= 1e-4 * max(1.0, scale), f'{what}: max abs error {error:.3g} at output scale {scale:.3g}'


def timm_model(name):
    kwargs = {'dynamic_img_size': True} if name in OTHER_SIZES else {}
    if name.startswith('vit_'):
        kwargs['num_classes'] = 0
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # timm starts BatchNorm at identity statistics and zero-inits each block's last scale,
    # which would hide layout mistakes: randomise them.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize('name', TIMM_NAMES)
def test_matches_timm(name):
    _check_matches_timm(name)


@pytest.mark.parametrize('name', ['deit_tiny_distilled_patch16_224', 'vit_small_patch16_224'])
def test_scanned_blocks_match_timm(name):
    """`scan_blocks` (one lax.scan over the stacked blocks) computes what timm computes, from the same
    converted weights; the DINO backbone also at its other sizes."""
    _check_matches_timm(name, scan_blocks=True)


def _check_matches_timm(name, **overrides):
    reference = timm_model(name)
    variables = from_torch(reference.state_dict(), name)
    model = create(name, **overrides)
    assert (sum(x.size for x in jax.tree.leaves(variables['params']))
            == sum(p.numel() for p in reference.parameters()))
    apply = jax.jit(model.apply, static_argnames=('train', 'both_heads'))
    generator = torch.Generator().manual_seed(1)
    for size in [getattr(model, 'img_size', 224)] + OTHER_SIZES.get(name, []):
        images = torch.randn(2, 3, size, size, generator=generator)
        with torch.no_grad():
            official_dino = name.startswith('vit_') and size != getattr(model, 'img_size', 224)
            expected = official_dino_forward(reference, images) if official_dino else reference(images)
        check_close(apply(variables, nhwc(images)), expected, f'{name} {size}px')

    if getattr(model, 'distilled', False):  # both heads, as in distillation training
        reference.train()
        reference.set_distilled_training(True)
        with torch.no_grad():
            expected_cls, expected_dist = reference(images)
        actual_cls, actual_dist = apply(variables, nhwc(images), train=True)
        check_close(actual_cls, expected_cls, f'{name} {size}px train cls head')
        check_close(actual_dist, expected_dist, f'{name} {size}px train dist head')


@pytest.mark.parametrize('antialias', [False, True])
@pytest.mark.parametrize('grid', [(6, 6), (24, 24), (7, 12), (1, 1)])
def test_resample_pos_embed_matches_torch_interpolate(grid, antialias):
    pos_embed = torch.randn(1, 2 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    patches = pos_embed[:, 2:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    resampled = F.interpolate(patches, size=grid, mode='bicubic', align_corners=False, antialias=antialias)
    expected = torch.cat([pos_embed[:, :2], resampled.permute(0, 2, 3, 1).reshape(1, -1, 8)], dim=1)
    actual = resample_pos_embed(jnp.asarray(pos_embed.numpy()), grid, 2, antialias=antialias)
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-5)
    named = resample_pos_embed(jnp.asarray(pos_embed.numpy()), grid, 2,
                               interpolation='antialias' if antialias else 'bicubic')
    np.testing.assert_array_equal(named, actual)


def official_dino_pos_encoding(pos_embed, h0, w0):
    """facebookresearch/dino's interpolate_pos_encoding on a [1, 1 + N, D] embedding, for a square grid."""
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = int(round(n ** 0.5))
    if h0 * w0 == n and h0 == w0:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((w0 + 0.1) / side, (h0 + 0.1) / side), mode='bicubic')
    assert grid.shape[-2:] == (w0, h0)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize('grid', [6, 12, 1, 28])
def test_dino_interpolation_matches_official_interpolate_pos_encoding(grid):
    pos_embed = torch.randn(1, 1 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    expected = official_dino_pos_encoding(pos_embed, grid, grid).numpy()
    actual = resample_pos_embed(jnp.asarray(pos_embed.numpy()), (grid, grid), 1, interpolation='dino')
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    plain = resample_pos_embed(jnp.asarray(pos_embed.numpy()), (grid, grid), 1, interpolation='bicubic')
    assert np.abs(np.asarray(plain) - expected).max() > 1e-2, "the +0.1 shift should matter at this grid"


def test_unknown_pos_embed_interpolation_is_refused():
    with pytest.raises(ValueError, match="antialias.*bicubic.*dino"):
        resample_pos_embed(jnp.zeros((1, 1 + 16, 4)), (2, 2), 1, interpolation='bilinear')


# ---------------------------------------------------------------------------
# DINO head and multi-crop wrapper, written as in the official repository.
# ---------------------------------------------------------------------------


class OfficialDinoHead(torch.nn.Module):
    """facebookresearch/dino's DINOHead (nlayers=3, with or without use_bn)."""

    def __init__(self, in_dim, out_dim, norm_last_layer, parametrized, hidden_dim=2048, bottleneck_dim=256,
                 use_bn=False):
        super().__init__()
        norm = (lambda: [torch.nn.BatchNorm1d(hidden_dim)]) if use_bn else (lambda: [])
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden_dim), *norm(), torch.nn.GELU(),
            torch.nn.Linear(hidden_dim, hidden_dim), *norm(), torch.nn.GELU(),
            torch.nn.Linear(hidden_dim, bottleneck_dim))
        with torch.no_grad():  # BatchNorm statistics away from identity, so a layout mistake shows
            for module in self.mlp:
                if isinstance(module, torch.nn.BatchNorm1d):
                    module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.2, 0.2)
        linear = torch.nn.Linear(bottleneck_dim, out_dim, bias=False)
        if parametrized:  # torch >= 2.1 spelling: parametrizations.weight.original0/original1
            self.last_layer = torch.nn.utils.parametrizations.weight_norm(linear)
            gain = self.last_layer.parametrizations.weight.original0
        else:
            self.last_layer = torch.nn.utils.weight_norm(linear)
            gain = self.last_layer.weight_g
        with torch.no_grad():
            gain.fill_(1.0) if norm_last_layer else gain.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def official_dino_forward(vit, x):
    """facebookresearch/dino's VisionTransformer.forward on timm's modules (same parameter names):
    patch embedding, CLS token, interpolate_pos_encoding, blocks, norm -> CLS."""
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    grid = x.shape[-1] // vit.patch_embed.patch_size[0]
    tokens = tokens + official_dino_pos_encoding(vit.pos_embed, grid, grid)
    return vit.norm(vit.blocks(tokens))[:, 0]


class OfficialMultiCrop(torch.nn.Module):
    """facebookresearch/dino's MultiCropWrapper: backbone per run of equal resolutions, head once."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        sizes = torch.tensor([crop.shape[-1] for crop in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        features, start = [], 0
        for end in ends.tolist():
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


DINO_CASES = {
    'micro, norm_last_layer': ('vit_micro_patch4_32', True, False, 4096, [32, 32, 16, 16]),
    'micro, BatchNorm in the head': ('vit_micro_patch4_32', True, False, 4096, [32, 32, 16, 16]),
    'micro, learned gain, parametrizations': ('vit_micro_patch4_32', False, True, 4096, [32, 32, 16, 16]),
    'vit_small, norm_last_layer': ('vit_small_patch16_224', True, False, 65536, [224, 224, 96, 96]),
}


@pytest.mark.filterwarnings('ignore:.*weight_norm.*:FutureWarning')  # the official head uses the old spelling
@pytest.mark.parametrize('case', DINO_CASES)
def test_dino_matches_official_layout(case):
    name, norm_last_layer, parametrized, out_dim, sizes = DINO_CASES[case]
    torch.manual_seed(0)
    if name == 'vit_micro_patch4_32':
        backbone = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0, dynamic_img_size=True)
    else:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    backbone.forward = lambda x, vit=backbone: official_dino_forward(vit, x)
    use_bn = 'BatchNorm' in case
    head = OfficialDinoHead(backbone.embed_dim, out_dim, norm_last_layer, parametrized, use_bn=use_bn)
    reference = OfficialMultiCrop(backbone, head).eval()
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randn(2, 3, size, size, generator=generator) for size in sizes]
    with torch.no_grad():
        expected = reference(crops)

    # A DINO training checkpoint: the student's keys carry `module.`.
    checkpoint = {'student': {f'module.{k}': v for k, v in reference.state_dict().items()}, 'epoch': 0}
    variables = from_torch(checkpoint, name, key='student', with_head=True)
    assert ('weight_g' in variables['params']['head']['last_layer']) == (not norm_last_layer)
    assert ('batch_stats' in variables) == use_bn
    model = create_dino(name, out_dim=out_dim, norm_last_layer=norm_last_layer, use_bn_in_head=use_bn)
    actual = jax.jit(model.apply)(variables, [nhwc(crop) for crop in crops])
    assert actual.shape == (len(crops) * 2, out_dim)
    check_close(actual, expected, f'DINO {case} {sizes}')
