"""RegNetY in timm's layout (`stem`, `s1..s4/b1..bN`, `head/fc`): the DeiT teacher regnety_160."""
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitdistill import cpu_gemm
from vitdistill.models.resnet import batch_norm


def regnet_stages(w0: int, wa: float, wm: float, depth: int, group_size: int, quant: int = 8):
    """Per-stage (width, depth, group width) from RegNet's linear-then-quantised width rule.

    Mirrors timm's `generate_regnet` + `adjust_widths_groups_comp` (bottleneck ratio 1),
    including its float32 arithmetic, so the widths match to the channel.
    """
    widths_cont = np.arange(depth, dtype=np.float32) * np.float32(wa) + np.float32(w0)
    exps = np.round(np.log(widths_cont / np.float32(w0)) / np.float32(np.log(wm)))
    widths = (np.round(np.float32(w0) * np.power(np.float32(wm), exps) / quant) * quant).astype(int)
    stage_widths, stage_depths = np.unique(widths, return_counts=True)
    stages = []
    for width, stage_depth in zip(stage_widths.tolist(), stage_depths.tolist()):
        group = min(group_size, width)
        stages.append((int(round(width / group) * group), stage_depth, group))
    return stages


def conv_init(groups: int):
    """timm's RegNet init: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 * groups / (kh * kw * out))

    return init


class GroupedConv(nn.Module):
    """A k×k convolution without bias in `groups` groups, with nn.Conv's parameter (`kernel`,
    [k, k, in / groups, out], so checkpoints and conversion are unchanged).

    `split` computes it as one dense convolution per group and concatenates the outputs: XLA:CPU runs a
    `feature_group_count` convolution 5-10x slower than the same work split this way (RegNetY-16GF's
    3x3 convolutions at batch 4: 113-256 ms against 13-39 ms; PyTorch 9-45 ms). On the same path a 1x1
    convolution without groups runs as one matrix product over the pixels (strided ones on the pixels they
    keep): the same numbers, and 1.2-2.5x faster than XLA:CPU's convolution at RegNetY-16GF's four widths
    (batch 4: 10.5 -> 4.3, 5.6 -> 4.6, 11.9 -> 8.8, 31.1 -> 17.6 ms; PyTorch 3.6, 3.4, 7.4, 16.3 ms;
    `experiments/pointwise_conv.py`).
    `None` picks `split` on the CPU and one (grouped) convolution elsewhere (cuDNN and TPUs run those well).
    On the CPU, where `cpu_gemm.grouped_conv_supported` (a one-device process, float32, AVX-512F or AVX2), a
    grouped convolution runs as one native call instead of the per-group ones: RegNetY-16GF's 18 grouped 3x3
    convolutions at batch 4 took 244.6 ms against 342.2 per group and 264.2 in PyTorch, the teacher's forward
    793 -> 745 ms (`experiments/grouped_conv.py`, a 2-core AMD EPYC host with AVX-512); with AVX2, on a Zen 3
    host, 286.4 ms against 375.4 and 313.0.
    """

    features: int
    kernel: int
    stride: int
    groups: int
    kernel_init: Any
    split: bool | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param('kernel', self.kernel_init,
                            (self.kernel, self.kernel, in_features // self.groups, self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        conv = partial(jax.lax.conv_general_dilated, window_strides=(self.stride, self.stride),
                       padding=[(self.kernel // 2, self.kernel // 2)] * 2,
                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        split = jax.default_backend() == 'cpu' if self.split is None else self.split
        if split and self.kernel == 1 and self.groups == 1:
            pixels = x[:, ::self.stride, ::self.stride, :]
            # (cpu_gemm: the native or MKL float32 product on a one-device CPU process where loaded, else lax's.)
            out = cpu_gemm.dot_general(pixels.reshape(-1, in_features), kernel[0, 0], (((1,), (0,)), ((), ())))
            return out.reshape(*pixels.shape[:-1], self.features)
        if self.groups == 1 or not split:
            return conv(x, kernel, feature_group_count=self.groups)
        if cpu_gemm.grouped_conv_supported(x, kernel, self.stride):
            return cpu_gemm.grouped_conv(x, kernel, self.stride, self.kernel // 2)
        return cpu_gemm.per_group_conv(x, kernel, self.stride, self.kernel // 2)


class ConvNormAct(nn.Module):
    """conv (no bias) -> BatchNorm -> optional ReLU, named `conv`/`bn` as in timm."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: bool = True
    zero_scale: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = GroupedConv(self.features, self.kernel, self.stride, self.groups, conv_init(self.groups),
                        dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)
        x = batch_norm(train, self.dtype, self.param_dtype, 'bn', self.zero_scale)(x)
        return nn.relu(x) if self.act else x


class SqueezeExcite(nn.Module):
    """Channel gate: mean-pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid (`fc1`, `fc2`)."""

    reduced: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = partial(nn.Conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=conv_init(1), bias_init=nn.initializers.zeros)
        gate = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = nn.relu(dense(self.reduced, name='fc1')(gate))
        return x * nn.sigmoid(dense(x.shape[-1], name='fc2')(gate))


class RegNetBlock(nn.Module):
    """1x1 -> grouped 3x3 (stride) -> SE -> 1x1, plus a 1x1 conv shortcut when the shape changes."""

    width: int
    stride: int
    group_width: int
    se_ratio: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_width = x.shape[-1]
        y = ConvNormAct(self.width, name='conv1', **dtypes)(x, train=train)
        y = ConvNormAct(self.width, 3, self.stride, self.width // self.group_width, name='conv2', **dtypes)(
            y, train=train)
        if self.se_ratio:
            # The squeeze width follows the block's *input* width (timm, pycls).
            y = SqueezeExcite(int(round(in_width * self.se_ratio)), name='se', **dtypes)(y)
        y = ConvNormAct(self.width, act=False, zero_scale=True, name='conv3', **dtypes)(y, train=train)
        if self.stride != 1 or in_width != self.width:
            x = ConvNormAct(self.width, 1, self.stride, act=False, name='downsample', **dtypes)(x, train=train)
        # The output feeds the next block twice: its first convolution and its shortcut's add. Unstored, XLA:CPU
        # fused it into that add as well as storing it, so each block's output fusion recomputed every earlier
        # block of its stage (stage 3's last: 12 products' outputs read, 11 normalisations redone; stage 4's
        # strided shortcut all of stage 3's). `optimization_barrier` does not stop it: XLA drops those before
        # fusing. RegNetY-16GF at batch 4 on a 2-core CPU (experiments/stored_block_outputs.py): forward
        # 684.7 -> 669.2 ms; the logits within 2.3e-8 of the recomputing form's.
        return cpu_gemm.stored(nn.relu(y + x))


class RegStage(nn.Module):
    """Blocks `b1..bN` of one width; the first one strides by 2."""

    width: int
    depth: int
    group_width: int
    se_ratio: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        for b in range(self.depth):
            x = RegNetBlock(self.width, 2 if b == 0 else 1, self.group_width, self.se_ratio, self.dtype,
                            self.param_dtype, name=f'b{b + 1}')(x, train=train)
        return x


class RegNet(nn.Module):
    """RegNet(Y): 3x3/2 stem, four stages of stride 2, average pool, `head/fc`.

    Returns class logits, or the pooled features when num_classes=0.
    """

    w0: int = 200
    wa: float = 106.23
    wm: float = 2.48
    group_size: int = 112
    depth: int = 18
    se_ratio: float = 0.25
    stem_width: int = 32
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvNormAct(self.stem_width, 3, 2, name='stem', **dtypes)(images.astype(self.dtype), train=train)
        stages = regnet_stages(self.w0, self.wa, self.wm, self.depth, self.group_size)
        for s, (width, stage_depth, group_width) in enumerate(stages):
            x = RegStage(width, stage_depth, group_width, self.se_ratio, name=f's{s + 1}', **dtypes)(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes == 0:
            return x
        return RegNetHead(self.num_classes, name='head', **dtypes)(x)


class RegNetHead(nn.Module):
    """timm's ClassifierHead scope: `head/fc`, init normal(0.01)."""

    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                        dtype=self.dtype, param_dtype=self.param_dtype, name='fc')(x)
