"""Official PyTorch checkpoints (DeiT, DINO, timm) -> Flax variables for `vitdistill.models.create(name)`.

    python -m vitdistill.convert --checkpoint=FILE.pth --model=NAME --output=DIR [--key=teacher|student] [--with_head]

Flax names mirror timm's, so one rule maps every key: `a.b.N.c.weight` -> `a/b_N/c/kernel`
(a numeric index joins the name before it), with the leaf renamed by `LEAF_RULES` and the
array laid out for Flax by its rank. Files are read with `torch.load(weights_only=True)`:
vitdistill never unpickles code.
"""
import argparse
import contextlib
import os
import pickle
import re
import sys
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from vitdistill.weights import save_variables
from vitdistill.models import MODELS, VisionTransformer, create, create_dino

# torch leaf name -> (Flax collection, Flax leaf name). `weight` depends on the rank: a
# norm's 1-D weight is its `scale`, a Linear/conv weight its `kernel`. Other leaves
# (cls_token, pos_embed, dist_token, weight_v, weight_g) keep their names.
LEAF_RULES = {
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
}
IGNORED_LEAVES = ('num_batches_tracked',)
DINO_HEAD_PREFIXES = ('head.mlp.', 'head.last_layer.')
WRAPPER_PREFIXES = ('module.', 'backbone.')  # DINO: student 'module.backbone.', teacher 'backbone.'
WEIGHT_NORM_RENAMES = {  # torch>=2.1 `parametrizations.weight_norm` spelling -> `nn.utils.weight_norm`'s
    'parametrizations.weight.original0': 'weight_g',
    'parametrizations.weight.original1': 'weight_v',
}


def flax_layout(array: np.ndarray) -> np.ndarray:
    """PyTorch's [out, in] / [out, in, kh, kw] -> Flax's [in, out] / [kh, kw, in, out]; others unchanged."""
    if array.ndim == 2:
        return array.T
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def flax_path(torch_key: str, ndim: int) -> tuple[str, ...]:
    """`blocks.0.attn.qkv.weight` -> ('params', 'blocks_0', 'attn', 'qkv', 'kernel')."""
    *modules, leaf = torch_key.split('.')
    path = []
    for part in modules:
        if part.isdigit() and path:
            path[-1] += f'_{part}'
        else:
            path.append(part)
    if leaf == 'weight':
        collection, leaf = 'params', 'scale' if ndim == 1 else 'kernel'
    else:
        collection, leaf = LEAF_RULES.get(leaf, ('params', leaf))
    return (collection, *path, leaf)


def torch_key(path: tuple[str, ...]) -> str:
    """The inverse of `flax_path`, to name the torch key a missing Flax parameter wants."""
    collection, *modules, leaf = path
    leaf = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}.get(leaf, leaf)
    return '.'.join([re.sub(r'_(\d+)$', r'.\1', part) for part in modules] + [leaf])


# ---------------------------------------------------------------------------
# Reading checkpoints.
# ---------------------------------------------------------------------------


def _torch_load(path: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: pip install -e '.[torch]'") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {os.path.abspath(path)}")
    # Official DeiT/DINO training checkpoints carry their argparse arguments: a plain
    # attribute bag, allowed explicitly. Everything else that is not a tensor is refused.
    allow = getattr(torch.serialization, 'safe_globals', None)
    try:
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0]
        if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
            raise ValueError(_unreadable(path, first_line)) from None
        raise ValueError(
            f"{path} holds pickled objects other than tensors, which vitdistill never unpickles (it could run "
            f"code): torch.load(weights_only=True) said: {first_line}. If you trust the file, re-save its weights "
            f"as a plain state dict of tensors, e.g. in Python: ckpt = torch.load('{path}', weights_only=False); "
            f"torch.save(ckpt['model'].state_dict() if hasattr(ckpt['model'], 'state_dict') else ckpt['model'], "
            f"'plain.pth')") from None
    except (RuntimeError, EOFError, KeyError, IndexError, OSError) as e:  # a truncated zip, random bytes
        raise ValueError(_unreadable(path, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
                         ) from None


def _unreadable(path: str, said: str) -> str:
    size = os.path.getsize(path)
    return (f"{path} ({size:,} bytes) is not a readable PyTorch checkpoint: it is truncated, or was not written by "
            f"torch.save (torch.load said: {said[:200]}). Download or copy it again, and check its size against "
            "the source's.")


def _to_numpy(name: str, value) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor; bfloat16 has no numpy dtype
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value)
    raise ValueError(f"checkpoint entry {name!r} is a {type(value).__name__}, not an array: expected a state dict")


def state_dict(checkpoint: str | Mapping[str, Any], *, key: str | None = None) -> dict[str, np.ndarray]:
    """The flat {torch key: array} of a checkpoint, unwrapped from the official layouts.

    DeiT `{'model': sd}`; DINO training checkpoints `{'teacher', 'student', ...}` (pick with
    `key`, default 'teacher') with `module.`/`backbone.` prefixes stripped; plain timm/DINO dicts.
    """
    obj = _torch_load(os.fspath(checkpoint)) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict or a dict wrapping one, got a {type(obj).__name__}")
    if 'teacher' in obj or 'student' in obj:
        key = key or 'teacher'
    elif key is None:
        key = next((k for k in ('model', 'state_dict') if isinstance(obj.get(k), Mapping)), None)
    if key is not None:
        if not isinstance(obj.get(key), Mapping):
            raise ValueError(f"checkpoint has no state dict under {key!r}; "
                             f"its top-level keys: {', '.join(map(str, obj))}")
        obj = obj[key]
    flat = {}
    for name, value in obj.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        for old, new in WEIGHT_NORM_RENAMES.items():
            name = name.replace(old, new)
        if name.split('.')[-1] not in IGNORED_LEAVES:
            flat[name] = _to_numpy(name, value)
    return flat


# ---------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------


def _dino_head_config(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """create_dino's head arguments, read off the head's weights."""
    out_dim, bottleneck_dim = sd['head.last_layer.weight_v'].shape
    gain = sd.get('head.last_layer.weight_g')
    norm_last_layer = gain is None or bool(np.all(gain == 1))
    if not norm_last_layer:
        logging.warning("the head's weight_g is not all ones: it was trained with norm_last_layer=False, so build "
                        "it with create_dino(..., norm_last_layer=False); the converted params include weight_g")
    return dict(out_dim=out_dim, hidden_dim=sd['head.mlp.0.weight'].shape[0], bottleneck_dim=bottleneck_dim,
                norm_last_layer=norm_last_layer, use_bn_in_head='head.mlp.1.running_mean' in sd)


CLASSIFIER_WEIGHTS = ('head.weight', 'fc.weight', 'head.fc.weight')  # ViT/DeiT, ResNet, RegNet (timm names)


def _classifier_classes(sd) -> int | None:
    """The class count of the checkpoint's classifier (its weight's rows), if it has one."""
    for key in CLASSIFIER_WEIGHTS:
        if key in sd and getattr(sd[key], 'ndim', 0) == 2:
            return int(sd[key].shape[0])
    return None


def _example_input(module):
    backbone = getattr(module, 'backbone', module)
    size = getattr(backbone, 'img_size', 64)
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return [images] if module is not backbone else images


def _shape(shape) -> str:
    return '[' + ', '.join(map(str, shape)) + ']'


def from_torch(checkpoint: str | Mapping[str, Any], name: str, *, key: str | None = None, with_head: bool = False,
               **overrides) -> dict[str, Any]:
    """Flax variables ({'params', 'batch_stats'} as numpy arrays) for `create(name, **overrides)`.

    With `with_head`, a DINO checkpoint's projection head is converted too and the variables
    fit `create_dino(name, ...)` (out_dim etc. read off the weights): {'params': {'backbone', 'head'}}.
    Without it, a DINO head in the checkpoint is skipped. Any other mismatch raises one error
    listing every missing, unexpected and mis-shaped parameter.
    """
    sd = state_dict(checkpoint, key=key)
    user_overrides = dict(overrides)
    head_keys = [k for k in sd if k.startswith(DINO_HEAD_PREFIXES)]
    if with_head:
        if not head_keys:
            raise ValueError(f"with_head=True, but the checkpoint has no DINO head "
                             f"({', '.join(p + '*' for p in DINO_HEAD_PREFIXES)}); "
                             "convert the backbone alone without with_head")
        config = _dino_head_config(sd)
        if config['norm_last_layer']:
            sd.pop('head.last_layer.weight_g', None)  # frozen at 1: no parameter in Flax
        sd = {k if k in head_keys else f'backbone.{k}': v for k, v in sd.items()}
        module = create_dino(name, **config, **overrides)
    else:
        if head_keys:
            logging.warning('skipping the DINO head (%d arrays); pass with_head=True to convert it', len(head_keys))
        sd = {k: v for k, v in sd.items() if k not in head_keys}
        overrides = {**_class_count(sd, name), **overrides}
        module = create(name, **overrides)

    expected = jax.eval_shape(module.init, jax.random.key(0), _example_input(module))
    expected = flax.traverse_util.flatten_dict(expected)
    converted = {flax_path(k, v.ndim): (k, v) for k, v in sd.items()}
    problems = _problems(converted, expected, name)
    if problems:
        raise ValueError(_misfit_message(sd, name, problems, with_head=with_head, user_overrides=user_overrides))

    flat = {path: flax_layout(v).astype(expected[path].dtype) for path, (_, v) in converted.items()}
    return flax.traverse_util.unflatten_dict(flat)


def _class_count(sd, name: str) -> dict:
    """`num_classes` for `create(name)`: the checkpoint's classifier's, or 0 (a backbone: DINO's, or any
    checkpoint without a classifier; fine-tuning adds a fresh head) for a classifier model."""
    classes = _classifier_classes(sd)
    if classes is not None:
        return {'num_classes': classes}
    if MODELS.get(name) is not None and MODELS[name][0] is VisionTransformer:
        return {'num_classes': 0}
    return {}


def _problems(converted, expected, name: str) -> dict:
    """{torch key: one line} for every missing, unexpected and mis-shaped parameter."""
    problems = {}
    for path in sorted(expected.keys() - converted.keys()):
        problems[torch_key(path)] = (f"  missing     {torch_key(path)} -> {'/'.join(path)} "
                                     f"{_shape(expected[path].shape)}")
    for path in sorted(converted.keys() - expected.keys()):
        k, v = converted[path]
        problems[k] = f"  unexpected  {k} {_shape(v.shape)} -> {'/'.join(path)}, not in {name}"
    for path in sorted(converted.keys() & expected.keys()):
        k, v = converted[path]
        if flax_layout(v).shape != expected[path].shape:
            problems[k] = (f"  mis-shaped  {k} {_shape(v.shape)} -> {'/'.join(path)} {_shape(flax_layout(v).shape)}, "
                           f"{name} expects {_shape(expected[path].shape)}")
    return problems


def fitting_models(sd) -> list[str]:
    """The model names whose parameters a backbone/classifier state dict fits exactly (shapes only)."""
    converted = {flax_path(k, v.ndim): (k, v) for k, v in sd.items()}
    fits = []
    for candidate in MODELS:
        try:
            module = create(candidate, **_class_count(sd, candidate))
            expected = flax.traverse_util.flatten_dict(
                jax.eval_shape(module.init, jax.random.key(0), _example_input(module)))
        except Exception:  # noqa: BLE001 - a model that cannot even be built for these weights does not fit
            continue
        if not _problems(converted, expected, candidate):
            fits.append(candidate)
    return fits


SHOWN_PROBLEMS = 12


def _misfit_message(sd, name: str, problems: dict, *, with_head: bool, user_overrides: dict) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    lines = list(problems.values())
    shown = lines[:SHOWN_PROBLEMS] + ([f"  ... and {len(lines) - SHOWN_PROBLEMS} more"]
                                      if len(lines) > SHOWN_PROBLEMS else [])
    hint = ''
    backbone = {k.removeprefix('backbone.'): v for k, v in sd.items() if not k.startswith(DINO_HEAD_PREFIXES)}
    fits = [] if user_overrides else [m for m in fitting_models(backbone) if m != name]
    if fits:
        hint = (f"\nThe checkpoint fits {', '.join(fits)}: convert it with --model={fits[0]}"
                + (" (with --with_head for its DINO head)" if with_head else ""))
    elif list(problems) == ['pos_embed']:
        hint = ("\n(only the position embedding differs: the checkpoint was trained at another image size; "
                "from_torch(..., img_size=N) builds the model at that size)")
    elif not user_overrides:
        hint = ("\nNo vitdistill model has these shapes; for a ViT of another width, depth or patch size add "
                "it to vitdistill.models.MODELS")
    return (f"checkpoint does not fit {name}{' with its DINO head' if with_head else ''} ({count}):\n"
            + '\n'.join(shown) + hint)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

def _define_flags():
    # Defined only when run as a program, so importing from_torch adds no global flags.
    flags.DEFINE_string('checkpoint', None, 'PyTorch checkpoint (.pth) in an official DeiT/DINO/timm layout.')
    flags.DEFINE_string('model', None, 'vitdistill model name (timm spelling), e.g. deit_small_patch16_224.')
    flags.DEFINE_string('output', None, 'Directory to write (orbax checkpoint + vitdistill.json).')
    flags.DEFINE_string('key', None, "DINO training checkpoints: which network, 'teacher' (default) or 'student'.")
    flags.DEFINE_bool('with_head', False, 'DINO: also convert the projection head (variables for create_dino).')
    flags.mark_flags_as_required(['checkpoint', 'model', 'output'])


def main(argv):
    del argv
    config = flags.FLAGS
    if not config['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    try:
        variables = from_torch(config.checkpoint, config.model, key=config.key, with_head=config.with_head)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f'error: {e}')
    metadata = dict(source=os.path.abspath(config.checkpoint), key=config.key, with_head=config.with_head)
    described = config.model
    if config.with_head:
        head = variables['params']['head']
        metadata['dino_head'] = dict(
            out_dim=int(head['last_layer']['weight_v'].shape[1]),
            hidden_dim=int(head['mlp_0']['kernel'].shape[1]),
            bottleneck_dim=int(head['last_layer']['weight_v'].shape[0]),
            norm_last_layer='weight_g' not in head['last_layer'], use_bn_in_head='mlp_1' in head)
        described += f" with its DINO head {metadata['dino_head']}"
    directory = save_variables(config.output, variables, model=config.model, **metadata)
    sizes = ', '.join(f'{sum(x.size for x in jax.tree.leaves(tree)):,} {collection}'
                      for collection, tree in variables.items())
    print(f'wrote {directory}: {described}, {sizes}, from {config.checkpoint}')

if __name__ == '__main__':
    _define_flags()
    app.run(main)
