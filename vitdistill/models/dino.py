"""DINO projection head and the multi-crop wrapper (backbone once per resolution, head once)."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitdistill import cpu_gemm
from vitdistill.models.vit import VisionTransformer, torch_default_init, trunc_normal_02


class DinoHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised Linear without bias (official DINO layout).

    Names follow the official `mlp.0/2/4` (with `use_bn`: Linear-BN-GELU as `mlp.0/1`, `mlp.3/4`, then
    `mlp.6`, official DINO's `use_bn_in_head`) and `last_layer.weight_v/weight_g`. `weight_v` is
    [in, out]; `weight_g` is [1, out] (PyTorch's [out, 1] transposed, kept 2-D because DINO's
    weight decay treats it as a matrix) and exists only when `norm_last_layer` is False:
    otherwise the gain is frozen at 1, so there is nothing to learn or store.
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        dense = dict(kernel_init=trunc_normal_02, bias_init=nn.initializers.zeros,
                     dtype=self.dtype, param_dtype=self.param_dtype, dot_general=cpu_gemm.dot_general)
        index = 0
        for _ in range(2):
            x = nn.Dense(self.hidden_dim, name=f'mlp_{index}', **dense)(x)
            if self.use_bn:
                x = TorchBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f'mlp_{index + 1}')(
                    x, train=train)
            x = nn.gelu(x, approximate=False)
            index += 3 if self.use_bn else 2
        x = nn.Dense(self.bottleneck_dim, name=f'mlp_{index}', **dense)(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
        return WeightNormLinear(self.out_dim, self.norm_last_layer, self.dtype, self.param_dtype,
                                name='last_layer')(x)


class TorchBatchNorm(nn.Module):
    """PyTorch's BatchNorm1d (eps 1e-5, momentum 0.1) over the rows of [N, C]: training normalises with the
    batch's biased variance and moves the running variance towards the unbiased one, N / (N - 1) times
    larger (Flax's BatchNorm keeps the biased one). Under jit over a mesh the statistics are the global
    batch's, as SyncBatchNorm's. Variables as Flax's: params `scale`, `bias`; batch_stats `mean`, `var`."""

    epsilon: float = 1e-5
    momentum: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        features = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
        running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
        if train:
            rows = x.astype(jnp.float32).reshape(-1, features)
            mean = rows.mean(axis=0)
            var = jnp.square(rows - mean).mean(axis=0)
            if not self.is_initializing():
                n = rows.shape[0]
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = ((1 - self.momentum) * running_var.value
                                     + self.momentum * var * (n / max(n - 1, 1)))
        else:
            mean, var = running_mean.value, running_var.value
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class WeightNormLinear(nn.Module):
    """y = x @ (g * v / ||v||), the norm taken per output unit, like `nn.utils.weight_norm(Linear)`."""

    features: int
    fixed_gain: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_dim = x.shape[-1]
        v = self.param('weight_v', torch_default_init(in_dim), (in_dim, self.features), self.param_dtype)
        v = v.astype(jnp.float32)
        # x @ (v / ||v||) computed as (x @ v) * (1 / ||v||): the same product with the scale on the
        # [B, out] result instead of the [in, out] kernel. XLA:CPU fuses the division into the dot
        # and ran the forward 120x slower (4.4 s against 36 ms for 256 x 65536 and 40 rows); the
        # column sums of squares as a matrix product are 3x faster again than a reduction there,
        # and HIGHEST keeps them float32 on TPU.
        sum_sq = jnp.matmul(jnp.ones((1, in_dim), jnp.float32), v * v, precision=jax.lax.Precision.HIGHEST)
        scale = jax.lax.rsqrt(sum_sq)
        if not self.fixed_gain:
            scale = scale * self.param('weight_g', nn.initializers.ones, (1, self.features), self.param_dtype)
        # The product runs in the compute dtype but accumulates and returns float32: the logits that the loss
        # divides by a temperature of 0.04 and sharpens are not rounded to bfloat16's 8 bits (AMP's are fp16
        # from an fp32 accumulation; its softmax runs in fp32).
        # (cpu_gemm: MKL's float32 product on a one-device CPU process where installed, else lax's.)
        logits = cpu_gemm.dot_general(x.astype(self.dtype), v.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return logits * scale


class DINO(nn.Module):
    """Backbone + head over a list of crops; returns [n_crops * B, out_dim], crop-major rows."""

    backbone: VisionTransformer
    head: DinoHead

    def __call__(self, crops: Sequence[Any], *, train: bool = False):
        """Runs the backbone once per run of consecutive same-resolution crops, then the head once."""
        features, group = [], []
        for crop in crops:
            if group and crop.shape[1:3] != group[0].shape[1:3]:
                features.append(self.backbone(jnp.concatenate(group), train=train))
                group = []
            group.append(crop)
        features.append(self.backbone(jnp.concatenate(group), train=train))
        return self.head(jnp.concatenate(features), train=train)
