"""Model variants by name (timm's spelling), the factories `create` / `create_dino`, `adapt_params`, and the
compute dtype a config names."""
import dataclasses
from typing import NamedTuple

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vitdistill.errors import CheckpointError, ConfigError
from vitdistill.models.dino import DINO, DinoHead
from vitdistill.models.regnet import RegNet
from vitdistill.models.resnet import ResNet
from vitdistill.models.vit import VisionTransformer, last_attention, resample_pos_embed

__all__ = ['MODELS', 'create', 'create_dino', 'adapt_params', 'fit_params', 'Fitted', 'compute_dtype', 'is_vit',
           'VisionTransformer', 'DINO', 'DinoHead', 'ResNet', 'RegNet', 'last_attention', 'resample_pos_embed']

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_MICRO = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4)

MODELS = {
    # DeiT (arXiv 2012.12877), ImageNet-1k classifiers.
    'deit_tiny_patch16_224': (VisionTransformer, _TINY),
    'deit_small_patch16_224': (VisionTransformer, _SMALL),
    'deit_base_patch16_224': (VisionTransformer, _BASE),
    'deit_base_patch16_384': (VisionTransformer, dict(_BASE, img_size=384)),
    'deit_tiny_distilled_patch16_224': (VisionTransformer, dict(_TINY, distilled=True)),
    'deit_small_distilled_patch16_224': (VisionTransformer, dict(_SMALL, distilled=True)),
    'deit_base_distilled_patch16_224': (VisionTransformer, dict(_BASE, distilled=True)),
    'deit_base_distilled_patch16_384': (VisionTransformer, dict(_BASE, img_size=384, distilled=True)),
    # DINO (arXiv 2104.14294) backbones: CLS features, no classifier; at other input sizes the position
    # embedding is resampled as DINO's own ViT does it (interpolate_pos_encoding).
    'vit_small_patch16_224': (VisionTransformer, dict(_SMALL, num_classes=0, pos_embed_interpolation='dino')),
    'vit_small_patch8_224': (VisionTransformer, dict(_SMALL, patch_size=8, num_classes=0,
                                                     pos_embed_interpolation='dino')),
    'vit_base_patch16_224': (VisionTransformer, dict(_BASE, num_classes=0, pos_embed_interpolation='dino')),
    'vit_base_patch8_224': (VisionTransformer, dict(_BASE, patch_size=8, num_classes=0,
                                                    pos_embed_interpolation='dino')),
    # CNN teachers.
    'resnet18': (ResNet, dict(block='basic', layers=(2, 2, 2, 2))),
    'resnet50': (ResNet, dict(block='bottleneck', layers=(3, 4, 6, 3))),
    'regnety_160': (RegNet, dict(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18, se_ratio=0.25)),
    # Small variants for CPU work on 28-32 px images.
    'deit_micro_patch4_32': (VisionTransformer, dict(_MICRO, num_classes=10)),
    'deit_micro_distilled_patch4_32': (VisionTransformer, dict(_MICRO, num_classes=10, distilled=True)),
    'vit_micro_patch4_32': (VisionTransformer, dict(_MICRO, num_classes=0, pos_embed_interpolation='dino')),
    'resnet_micro': (ResNet, dict(block='basic', layers=(1, 1, 1, 1), widths=(32, 64, 128, 256), stem_width=32,
                                  cifar_stem=True, num_classes=10)),
}


def is_vit(name: str) -> bool:
    """Whether `name` is a Vision Transformer (its position embedding is sized for an image size)."""
    return name in MODELS and MODELS[name][0] is VisionTransformer


def compute_dtype(name: str):
    """The compute dtype `config.model.dtype` names; 'auto' is bfloat16 where the hardware has fast bfloat16
    (GPU, TPU), else float32.

    The official runs use mixed precision too (PyTorch AMP); parameters always stay float32.
    """
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ConfigError(f"config.model.dtype={name!r} is not a dtype; use auto, float32 or bfloat16") from e


def create(name: str, **overrides) -> nn.Module:
    """The module for `name`, with dataclass fields overridden (num_classes, img_size, dtype, ...)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    module_cls, defaults = MODELS[name]
    fields = [f.name for f in dataclasses.fields(module_cls) if f.name not in ('parent', 'name')]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        keys = [f"--config.model.{key}=0" for key in unknown if key in ("drop_path_rate", "drop_rate")]
        fix = f" (set {' '.join(keys)}: the config's default is for ViTs)" if keys else ""
        raise ConfigError(f"{name} ({module_cls.__name__}) has no field {', '.join(map(repr, unknown))}{fix}; "
                          f"valid fields: {', '.join(fields)}")
    return module_cls(**{**defaults, **overrides})


def create_dino(backbone_name: str, *, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                norm_last_layer: bool = True, use_bn_in_head: bool = False, **backbone_overrides) -> DINO:
    """A DINO student/teacher: the named ViT backbone (num_classes=0) plus the projection head.

    Crops of another size than the backbone's get the position embeddings resampled as official
    DINO does (`pos_embed_interpolation='dino'`) unless the overrides say otherwise.
    """
    backbone_overrides.setdefault('pos_embed_interpolation', 'dino')
    if backbone_overrides.get('num_classes', 0) != 0:
        raise ConfigError(f"a DINO backbone has no classifier; drop num_classes={backbone_overrides['num_classes']}")
    backbone = create(backbone_name, **{**backbone_overrides, 'num_classes': 0})
    if not isinstance(backbone, VisionTransformer):
        raise ConfigError(f"DINO needs a Vision Transformer backbone; {backbone_name!r} is a {type(backbone).__name__}")
    head = DinoHead(out_dim, hidden_dim, bottleneck_dim, norm_last_layer, use_bn_in_head,
                    dtype=backbone.dtype, param_dtype=backbone.param_dtype)
    return DINO(backbone, head)


CLASSIFIER_SCOPES = ('head', 'head_dist', 'fc')  # ViT/DINO/RegNet heads, ResNet's fc


def _prefix_tokens(pos_embed_path, flat_params):
    return 2 if pos_embed_path.replace('pos_embed', 'dist_token') in flat_params else 1


class Fitted(NamedTuple):
    """Pretrained params fitted to a model, and what happened to each array (flat '/'-joined paths)."""

    params: dict
    loaded: list       # taken from the pretrained params as they are
    resampled: list    # position embeddings resampled to the model's grid
    fresh: list        # kept at their fresh init: absent from the pretrained params, or a head of another size
    ignored: list      # pretrained params the model has not


def fit_params(loaded, target) -> Fitted:
    """Pretrained `loaded` params fitted to a fresh model's `target` params, for fine-tuning.

    - a 224-px position embedding is resampled to the target's grid with plain bicubic
      (`F.interpolate(mode='bicubic')`, as the official DeiT fine-tuning script does);
    - a classifier or DINO head that is absent or sized for other classes keeps its fresh init;
    - backbone-only params load into a DINO model's `backbone`, and a DINO model's backbone
      into a plain ViT.
    Any other mismatch (another width or depth) is an error naming every clash.
    """
    left_out = []  # a DINO model's head (anything beside its backbone) when only the backbone is wanted
    if 'backbone' in target and 'backbone' not in loaded:
        loaded = {'backbone': loaded}
    elif 'backbone' in loaded and 'backbone' not in target:
        left_out = list(flax.traverse_util.flatten_dict({k: v for k, v in loaded.items() if k != 'backbone'},
                                                        sep='/'))
        loaded = loaded['backbone']
    loaded = flax.traverse_util.flatten_dict(loaded, sep='/')
    target = flax.traverse_util.flatten_dict(target, sep='/')
    fitted, taken, resampled, fresh, clashes = {}, [], [], [], []
    for path, fresh_value in target.items():
        value = loaded.get(path)
        if value is None:
            fresh.append(path)
        elif value.shape == fresh_value.shape:
            fitted[path] = value
            taken.append(path)
        elif path.endswith('pos_embed') and _prefix_tokens(path, loaded) == _prefix_tokens(path, target):
            prefix = _prefix_tokens(path, target)
            grid = int(round((fresh_value.shape[1] - prefix) ** 0.5))
            fitted[path] = np.asarray(resample_pos_embed(value, (grid, grid), prefix, interpolation='bicubic'))
            resampled.append(path)
        elif path.split('/')[0] in CLASSIFIER_SCOPES:
            fresh.append(path)
        else:
            clashes.append(f'{path}: pretrained {list(value.shape)}, model {list(fresh_value.shape)}')
    if clashes or not any(path in loaded for path in target):
        raise CheckpointError('the pretrained params do not fit this model (another architecture?):\n  '
                              + '\n  '.join(clashes or ['no parameter name in common']))
    return Fitted(flax.traverse_util.unflatten_dict({**target, **fitted}, sep='/'), taken, resampled, fresh,
                  sorted(set(loaded) - set(target)) + sorted(left_out))


def adapt_params(loaded, target):
    """`fit_params(loaded, target).params`, logging what was resampled, kept fresh and ignored."""
    fitted = fit_params(loaded, target)
    for path in fitted.resampled:
        logging.info('resampled %s to the model\'s grid', path)
    if fitted.fresh:
        logging.warning('kept the fresh init of %d params not in (or not fitting) the pretrained ones: %s',
                        len(fitted.fresh), ', '.join(fitted.fresh))
    if fitted.ignored:
        logging.info('ignored %d pretrained params the model does not have: %s', len(fitted.ignored),
                     ', '.join(fitted.ignored))
    return fitted.params
