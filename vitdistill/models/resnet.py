"""ResNet in timm's layout (`conv1`, `bn1`, `layer{i}_{j}/...`, `fc`): CNN teachers for DeiT."""
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitdistill.models.vit import torch_default_init

# timm: kaiming_normal_(mode='fan_out', nonlinearity='relu') for every conv.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train: bool, dtype, param_dtype, name: str, zero_scale: bool = False):
    """PyTorch's BatchNorm2d: eps 1e-5, momentum 0.1 (Flax's 0.9); running averages when not training.

    One difference remains: PyTorch updates running_var with the unbiased batch variance,
    Flax with the biased one (a factor n/(n-1) on the update, negligible at usual batch sizes).
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=param_dtype, name=name,
                        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones)


class BasicBlock(nn.Module):
    """3x3 -> 3x3 residual block (ResNet-18/34); the stride sits on conv1."""

    width: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        conv = partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(batch_norm, train, self.dtype, self.param_dtype)
        shortcut = x
        y = nn.relu(norm('bn1')(conv(self.width, (3, 3), self.stride, padding=1, name='conv1')(x)))
        y = norm('bn2', zero_scale=True)(conv(self.width, (3, 3), padding=1, name='conv2')(y))
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = norm('downsample_1')(conv(self.width, (1, 1), self.stride, name='downsample_0')(x))
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as in torchvision/timm) -> 1x1 with 4x expansion (ResNet-50)."""

    width: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        conv = partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(batch_norm, train, self.dtype, self.param_dtype)
        out_width = 4 * self.width
        shortcut = x
        y = nn.relu(norm('bn1')(conv(self.width, (1, 1), name='conv1')(x)))
        y = nn.relu(norm('bn2')(conv(self.width, (3, 3), self.stride, padding=1, name='conv2')(y)))
        y = norm('bn3', zero_scale=True)(conv(out_width, (1, 1), name='conv3')(y))
        if self.stride != 1 or x.shape[-1] != out_width:
            shortcut = norm('downsample_1')(conv(out_width, (1, 1), self.stride, name='downsample_0')(x))
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet; `cifar_stem` swaps the 7x7/2 conv + max-pool for one 3x3/1 conv (28-32 px images).

    Returns class logits, or the globally average-pooled features when num_classes=0.
    """

    block: str = 'bottleneck'
    layers: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    cifar_stem: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
        conv = partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)
        if self.cifar_stem:
            x = conv(self.stem_width, (3, 3), padding=1, name='conv1')(x)
        else:
            x = conv(self.stem_width, (7, 7), 2, padding=3, name='conv1')(x)
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, 'bn1')(x))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (depth, width) in enumerate(zip(self.layers, self.widths)):
            for j in range(depth):
                stride = 2 if stage > 0 and j == 0 else 1
                x = block_cls(width, stride, self.dtype, self.param_dtype, name=f'layer{stage + 1}_{j}')(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes == 0:
            return x
        init = torch_default_init(x.shape[-1])
        return nn.Dense(self.num_classes, kernel_init=init, bias_init=init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='fc')(x)
