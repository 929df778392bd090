"""Vision Transformer shared by DeiT (optionally distilled) and DINO backbones.

Parameter names mirror timm's `VisionTransformer` / `VisionTransformerDistilled` so that
official checkpoints convert with the short rule table in `vitdistill.convert`.
"""
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitdistill import cpu_gemm
from vitdistill.errors import ConfigError

def trunc_normal(std: float, a: float = -2.0, b: float = 2.0):
    """timm's (0.3.2 and later) and DINO's `trunc_normal_(tensor, std=std)`: N(0, std^2) truncated to [a, b]
    in absolute units, so at std 0.02 a truncation at +-100 standard deviations, in effect N(0, 0.02^2).
    (Flax's `truncated_normal(stddev)` truncates at +-2 standard deviations and does not rescale: std 0.0176,
    no value beyond +-0.04.)"""
    return nn.initializers.truncated_normal(stddev=std, lower=a / std, upper=b / std)


trunc_normal_02 = trunc_normal(0.02)


def torch_default_init(fan_in: int):
    """PyTorch's default Linear/Conv init, U(±1/sqrt(fan_in)), for weights and biases alike."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ---------------------------------------------------------------------------
# Position-embedding resampling.
# ---------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` (PyTorch: -0.75, antialiased PyTorch/PIL: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, *, antialias: bool, scale_factor: float | None = None) -> np.ndarray:
    """[out_size, in_size] matrix equal to 1-D `F.interpolate(mode='bicubic', align_corners=False)`.

    antialias=False: PyTorch's upsample_bicubic2d: a = -0.75, source coordinate
    (i + 0.5) / s - 0.5 (not clamped), the four taps' indices clamped to the border, where s is
    `scale_factor` when given (F.interpolate(scale_factor=s), as official DINO calls it) and
    out/in otherwise (F.interpolate(size=out)).
    antialias=True: PyTorch's antialiased kernel (what timm's `dynamic_img_size` uses):
    a = -0.5, the kernel widened by in/out when shrinking, taps outside the input dropped
    and the remaining weights renormalised.
    """
    if antialias and scale_factor is not None:
        raise ValueError("bicubic_matrix: scale_factor is only for the plain (antialias=False) kernel")
    scale = in_size / out_size if scale_factor is None else 1.0 / scale_factor
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        if antialias:
            support = 2.0 * max(scale, 1.0)
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            weights = _cubic((taps - center + 0.5) / max(scale, 1.0), a=-0.5)
            matrix[i, taps] = weights / weights.sum()
        else:
            src = (i + 0.5) * scale - 0.5
            base = int(np.floor(src))
            t = src - base
            weights = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), a=-0.75)
            for offset, weight in zip(range(-1, 3), weights):
                matrix[i, min(max(base + offset, 0), in_size - 1)] += weight
    return matrix


DINO_SCALE_OFFSET = 0.1  # official DINO's interpolate_pos_encoding: scale_factor = (n + 0.1) / N

# interpolation name -> the 1-D [new, old] resampling matrix
_RESAMPLE_MATRICES = {
    'antialias': lambda old, new: bicubic_matrix(old, new, antialias=True),
    'bicubic': lambda old, new: bicubic_matrix(old, new, antialias=False),
    'dino': lambda old, new: bicubic_matrix(old, new, antialias=False, scale_factor=(new + DINO_SCALE_OFFSET) / old),
}
POS_EMBED_INTERPOLATIONS = tuple(_RESAMPLE_MATRICES)


def resample_pos_embed(pos_embed, new_grid_hw: Sequence[int], num_prefix_tokens: int, *, antialias: bool = False,
                       interpolation: str | None = None):
    """Bicubically resamples the patch part of a [1, T, D] position embedding to a new grid.

    The old grid is square (as in every model here). `interpolation` picks the reference:
    'bicubic' is `F.interpolate(size=grid, mode='bicubic', align_corners=False)` (the official DeiT
    fine-tuning script), 'antialias' the same with `antialias=True` (timm's `dynamic_img_size`),
    'dino' official DINO's `interpolate_pos_encoding`, `F.interpolate(scale_factor=(n + 0.1) / N,
    mode='bicubic')`, whose sampling grid is shifted slightly; without it, `antialias` chooses
    between the first two. The interpolation is two small constant matrices, so it is cheap
    inside a jitted step. (For a non-square grid official DINO scales rows by the width and
    columns by the height; here rows follow the height, as only square crops reach it there.)
    """
    if interpolation is None:
        interpolation = 'antialias' if antialias else 'bicubic'
    if interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"position-embedding interpolation must be one of {POS_EMBED_INTERPOLATIONS}, "
                         f"not {interpolation!r}")
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(round(np.sqrt(patches.shape[1])))
    if old * old != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    new_h, new_w = new_grid_hw
    if (new_h, new_w) == (old, old):
        return pos_embed
    rows = jnp.asarray(_RESAMPLE_MATRICES[interpolation](old, new_h), jnp.float32)
    cols = jnp.asarray(_RESAMPLE_MATRICES[interpolation](old, new_w), jnp.float32)
    grid = einops.rearrange(patches, 'b (h w) d -> b h w d', h=old).astype(jnp.float32)
    grid = jnp.einsum('ih,jw,bhwd->bijd', rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    grid = einops.rearrange(grid, 'b h w d -> b (h w) d').astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


# ---------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block: linear from 0 to `drop_path_rate` (timm, DeiT, DINO)."""
    return [float(r) for r in np.linspace(0.0, drop_path_rate, depth)]


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability `rate` (rng stream 'dropout')."""

    rate: float

    @nn.compact
    def __call__(self, x, *, train: bool):
        if not train:
            return x
        if isinstance(self.rate, (int, float)):
            if self.rate == 0.0:
                return x
            if self.rate == 1.0:
                return jnp.zeros_like(x)
        # a traced rate (the blocks under `scan_blocks`) must be below 1; at 0 every sample is kept
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


class PatchEmbed(nn.Module):
    """P×P stride-P conv, named `proj` as in timm."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        fan_in = 3 * self.patch_size**2
        return nn.Conv(
            self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size, padding='VALID',
            kernel_init=torch_default_init(fan_in), bias_init=torch_default_init(fan_in),
            dtype=self.dtype, param_dtype=self.param_dtype, name='proj',
            # the image's patches times the kernel, as one product, on a one-device CPU process (cpu_gemm)
            conv_general_dilated=cpu_gemm.conv_general_dilated)(images)


def _dense(features, dtype, param_dtype, name):
    # cpu_gemm.dot_general: MKL's float32 products on a one-device CPU process where installed, else lax's.
    return nn.Dense(features, kernel_init=trunc_normal_02, bias_init=nn.initializers.zeros,
                    dtype=dtype, param_dtype=param_dtype, dot_general=cpu_gemm.dot_general, name=name)


def _on_rows(layer, x):
    """`layer` (a per-token Dense) applied to the tokens [..., c] as one [n, c] matrix, reshaped back.

    The same numbers, and a faster backward pass on XLA:CPU: with [b, t, c] activations the weight gradient
    contracts two dimensions, and XLA:CPU then materialises a transposed copy of the activation gradient for
    it (for fc1 a [1536, b t] copy, with GELU's backward fusion computed twice). On rows the gradient is one
    plain contraction. DeiT-S forward and backward at batch 4: 572.0 -> 522.2 ms (in turns in one process,
    medians of 12 rounds; `experiments/token_rows.py`, `experiments/results/README.md`)."""
    y = layer(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; also returns the softmax weights, or None
    where a fused kernel ran.

    Where the weights are not collected and attention dropout is off (as below), a one-device CPU process whose
    products run on MKL computes attention by `cpu_gemm.qkv_attention`: the same products and softmax, with the
    output and the gradient of the projection written in place by strided products.

    With `fused` (the default), `jax.nn.dot_product_attention` runs cuDNN's fused (flash) attention on a
    GPU with half-precision inputs, when nobody collects the weights (the `intermediates` collection is
    not mutable: not attention maps or probes) and attention dropout is off. Everywhere else the weights are
    computed explicitly (heads-first batched matmuls, float32 softmax); with tokens first and einsum this
    path was already as fast on XLA:CPU as XLA's own formulation of `dot_product_attention` (0.95x-1.0x in
    one-process A/B runs of a DeiT-S step).
    """

    num_heads: int
    attn_drop_rate: float = 0.0
    fused: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        qkv = _on_rows(_dense(3 * dim, self.dtype, self.param_dtype, 'qkv'), x)
        kernel = fused_attention_kernel(qkv.dtype) if self.fused else None
        # timm's layout of the fused projection: [q | k | v], each split into heads.
        weightless = self.fused and not self.is_mutable_collection('intermediates') and not (
            train and self.attn_drop_rate > 0)
        if weightless and kernel is not None:
            weights = None
            q, k, v = einops.rearrange(qkv, 'b t (qkv h d) -> qkv b t h d', qkv=3, h=self.num_heads)
            out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5, implementation=kernel)
            out = einops.rearrange(out, 'b t h d -> b t (h d)')
        elif weightless and cpu_gemm.strided_attention_enabled(qkv):
            # On a CPU whose products run on MKL: the heads written side by side into the output, and dq, dk, dv
            # into the gradient of qkv, in place by strided products, without the layout copies back (DeiT-S
            # forward and backward 3.5-5.9 % faster in three runs, 5.3 % slower in a fourth;
            # experiments/strided_attention.py).
            weights = None
            out = cpu_gemm.qkv_attention(qkv, self.num_heads)
        else:
            # Heads first ([b, h, t, d]) so both products are plain batched matmuls: 4 % faster on XLA:CPU
            # than contracting [b, t, h, d] with einsum (experiments/attention_variants.py).
            # Both products through cpu_gemm: MKL's on a one-device CPU process where installed, else XLA's.
            q, k, v = einops.rearrange(qkv, 'b t (qkv h d) -> qkv b h t d', qkv=3, h=self.num_heads)
            logits = cpu_gemm.batched_matmul(q * head_dim**-0.5, k, tb=True)
            # cpu_gemm.softmax_last: the native row kernel on a one-device CPU process where it is built.
            weights = cpu_gemm.softmax_last(logits.astype(jnp.float32))
            dropped = nn.Dropout(self.attn_drop_rate, deterministic=not train)(weights).astype(self.dtype)
            out = einops.rearrange(cpu_gemm.batched_matmul(dropped, v), 'b h t d -> b t (h d)')
        return _on_rows(_dense(dim, self.dtype, self.param_dtype, 'proj'), out), weights


def fused_attention_kernel(dtype) -> str | None:
    """The `jax.nn.dot_product_attention` implementation fused attention uses: 'cudnn' on a GPU with
    float16/bfloat16 inputs, else None (the explicit path)."""
    if jax.default_backend() == 'gpu' and dtype in (jnp.bfloat16, jnp.float16):
        return 'cudnn'
    return None


def gelu(x):
    """Exact GELU as PyTorch computes it, x/2 (1 + erf(x/sqrt 2)) (Flax's exact form goes through erfc, which
    XLA:CPU evaluates more slowly)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(np.sqrt(0.5)).astype(x.dtype)))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    hidden_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        x = _on_rows(_dense(self.hidden_dim, self.dtype, self.param_dtype, 'fc1'), x)
        x = gelu(x)
        return _on_rows(_dense(dim, self.dtype, self.param_dtype, 'fc2'), x)


class NativeLayerNorm(nn.Module):
    """LayerNorm over the last dimension by the native row kernel (`cpu_gemm.layer_norm`, float32, the variance
    in PyTorch's two passes), with Flax's `nn.LayerNorm` parameters ('scale' and 'bias', [dim]): the two are
    interchangeable in a parameter tree."""

    epsilon: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return cpu_gemm.layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
                                   self.epsilon)


def _layer_norm(dtype, param_dtype, name):
    """timm's LayerNorm (eps 1e-6): the native kernel's in float32 on a one-device CPU process where
    `cpu_gemm.rows_enabled()` (forward and backward at a DeiT-S block's shape, 0.32 -> 0.15 ms; PyTorch 0.15), else
    Flax's, which computes the statistics in float32 whatever the compute dtype."""
    if dtype == jnp.float32 and cpu_gemm.rows_enabled():
        return NativeLayerNorm(epsilon=1e-6, param_dtype=param_dtype, name=name)
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name)


class Block(nn.Module):
    """Pre-norm transformer block; sows its attention weights (DINO's maps) and output tokens (linear probes).

    `train` is positional so that `nn.remat` can hold it static."""

    num_heads: int
    mlp_ratio: float = 4.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    fused_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        branch, attention = Attention(self.num_heads, self.attn_drop_rate, self.fused_attention, name='attn',
                                      **dtypes)(_layer_norm(name='norm1', **dtypes)(x), train=train)
        if attention is not None:
            self.sow('intermediates', 'attention', attention)
        x = x + DropPath(self.drop_path_rate)(branch, train=train)
        branch = Mlp(int(x.shape[-1] * self.mlp_ratio), name='mlp', **dtypes)(_layer_norm(name='norm2', **dtypes)(x))
        x = x + DropPath(self.drop_path_rate)(branch, train=train)
        self.sow('intermediates', 'tokens', x)
        return x


class VisionTransformer(nn.Module):
    """ViT / DeiT / distilled DeiT / DINO backbone (num_classes=0), timm's architecture.

    Inputs whose sides are multiples of `patch_size` but differ from `img_size` get the
    patch position embeddings resampled bicubically, by `pos_embed_interpolation`: 'antialias'
    reproduces timm's `dynamic_img_size=True` (PyTorch's antialiased bicubic, a = -0.5);
    'bicubic' plain `F.interpolate(size=..., mode='bicubic')` (a = -0.75), as the official DeiT
    fine-tuning script does; 'dino' official DINO's `interpolate_pos_encoding` (plain bicubic with
    `scale_factor=(n + 0.1) / N`), the default of the DINO backbones (`vit_*`) and of `models.create_dino`.

    `drop_rate` is dropout on the token(s) entering the head, as in timm >= 0.9; DeiT's
    original timm 0.3 also applied it after the position embedding and inside the blocks
    (DeiT's default is 0 either way).

    Speed and memory: `remat` recomputes each block's activations in the backward pass instead of keeping
    them (`nn.remat`: less memory for about a third more compute, same numbers); `fused_attention` (the
    default) runs cuDNN's flash attention on GPUs in half precision (see `Attention`); `scan_blocks` runs
    the blocks as one `jax.lax.scan` over their stacked parameters, so that XLA compiles one block instead
    of `depth` (see `_scanned_blocks`).
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    distilled: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pos_embed_interpolation: str = 'antialias'
    remat: bool = False
    fused_attention: bool = True
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ConfigError(f"pos_embed_interpolation={self.pos_embed_interpolation!r}; "
                              f"valid: {', '.join(POS_EMBED_INTERPOLATIONS)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, images, *, train: bool = False, both_heads: bool | None = None):
        """Class logits [B, C]; distilled: the heads' mean, or (cls, dist) logits when `both_heads`
        (default: `train`); num_classes=0: the final-norm CLS feature [B, D]."""
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        x = PatchEmbed(self.patch_size, self.embed_dim, name='patch_embed', **dtypes)(images.astype(self.dtype))
        x = einops.rearrange(x, 'b h w d -> b (h w) d')  # patches in row-major order, as timm flattens them

        prefix = [self.param('cls_token', trunc_normal_02, (1, 1, self.embed_dim), self.param_dtype)]
        if self.distilled:
            prefix.append(self.param('dist_token', trunc_normal_02, (1, 1, self.embed_dim), self.param_dtype))
        native_grid = self.img_size // self.patch_size
        pos_embed = self.param('pos_embed', trunc_normal_02,
                               (1, len(prefix) + native_grid**2, self.embed_dim), self.param_dtype)
        pos_embed = resample_pos_embed(pos_embed, (height // self.patch_size, width // self.patch_size),
                                       len(prefix), interpolation=self.pos_embed_interpolation)
        prefix = [jnp.broadcast_to(token, (batch, 1, self.embed_dim)).astype(self.dtype) for token in prefix]
        x = jnp.concatenate(prefix + [x], axis=1) + pos_embed.astype(self.dtype)

        if self.scan_blocks and not self.is_initializing() and not self.is_mutable_collection('intermediates'):
            x = self._scanned_blocks(x, train)
        else:
            block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
            for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
                x = block(self.num_heads, self.mlp_ratio, self.attn_drop_rate, rate, self.fused_attention,
                          name=f'blocks_{i}', **dtypes)(x, train)
        x = _layer_norm(name='norm', **dtypes)(x)

        head_drop = nn.Dropout(self.drop_rate, deterministic=not train)
        if not self.distilled:
            if self.num_classes == 0:
                return x[:, 0]
            return _dense(self.num_classes, self.dtype, self.param_dtype, 'head')(head_drop(x[:, 0]))
        if self.num_classes == 0:
            return (x[:, 0] + x[:, 1]) / 2
        cls_logits = _dense(self.num_classes, self.dtype, self.param_dtype, 'head')(head_drop(x[:, 0]))
        dist_logits = _dense(self.num_classes, self.dtype, self.param_dtype, 'head_dist')(head_drop(x[:, 1]))
        if train if both_heads is None else both_heads:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def _scanned_blocks(self, x, train: bool):
        """The blocks as one `jax.lax.scan` (`scan_blocks`): their parameters keep the per-block layout
        (`blocks_0` ... `blocks_{depth-1}`, as checkpoints, conversion and the optimiser know them) and are
        stacked here, at each call, into the scan's inputs; the gradients flow back through the stacking.

        Without dropout or drop path the outputs and gradients are the loop's (same arithmetic). With them,
        each block draws from its own key split from the 'dropout' stream, so the random masks are other draws
        of the same distributions than the loop's. Initialisation and runs that collect intermediates
        (attention maps, probes' tokens) take the loop."""
        params = self.variables['params']
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                               *[params[f'blocks_{i}'] for i in range(self.depth)])
        random = train and (self.drop_path_rate > 0 or self.attn_drop_rate > 0)
        rates = jnp.asarray(drop_path_rates(self.drop_path_rate, self.depth), jnp.float32)
        keys = jax.random.split(self.make_rng('dropout'), self.depth) if random else jnp.zeros((self.depth,))

        def block(x, inputs):
            block_params, rate, key = inputs
            module = Block(self.num_heads, self.mlp_ratio, self.attn_drop_rate,
                           rate if self.drop_path_rate > 0 else 0.0, self.fused_attention,
                           dtype=self.dtype, param_dtype=self.param_dtype)
            out = module.apply({'params': block_params}, x, train, rngs={'dropout': key} if random else None)
            return out, None

        if self.remat:
            block = jax.checkpoint(block)
        x, _ = jax.lax.scan(block, x, (stacked, rates, keys))
        return x


def last_attention(model: VisionTransformer, variables, images):
    """Softmax attention of the last block, [B, heads, T, T] (DINO's attention maps)."""
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    return state['intermediates'][f'blocks_{model.depth - 1}']['attention'][0]
