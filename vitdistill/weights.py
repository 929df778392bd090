"""A model's variables on disk: the directory `python -m vitdistill.convert` writes (an orbax checkpoint plus
`vitdistill.json` saying what it is), and the reading of any model's weights, from such a directory or from
a training workdir, for `init_from`, a DeiT teacher and evaluation.

The training state's own checkpoints (optimiser, step, ...) are `vitdistill.train.state_checkpoints`'.
"""
import json
import os
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from vitdistill import models, paths
from vitdistill.errors import CheckpointError, first_line
from vitdistill.train import sharding, state_checkpoints
from vitdistill.train.reporting import CONFIG_FILE

METADATA_FILE = 'vitdistill.json'
VARIABLES_DIR = 'variables'
HOW_TO_MAKE = ("write one with vitdistill.weights.save_variables, or convert an official PyTorch checkpoint: "
               "python -m vitdistill.convert --checkpoint=FILE.pth --model=NAME --output=DIR")


def save_variables(directory: str, variables: dict[str, Any], *, model: str, **metadata) -> str:
    """Writes `variables` ({'params': ..., 'batch_stats': ...}) and their model name; returns the directory.

    Overwrites the variables of an earlier save in the same directory. `metadata` must be
    JSON-serialisable (where the weights came from, the head's shape, ...).
    """
    directory = paths.check_checkpointable(directory, "weights directory")
    record = json.dumps({'model': model, **metadata}, indent=2, sort_keys=True)
    paths.makedirs(directory)
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables, force=True)
    # Written last: a directory with this file holds a complete checkpoint.
    with paths.open_file(os.path.join(directory, METADATA_FILE), 'w') as f:
        f.write(record + '\n')
    return directory


def read_metadata(directory: str) -> dict[str, Any]:
    """The `vitdistill.json` record of a checkpoint directory (model name and metadata)."""
    directory = paths.absolute(directory)
    path = os.path.join(directory, METADATA_FILE)
    if not paths.isdir(directory):
        raise CheckpointError(f"no checkpoint directory at {directory}: expected a directory holding "
                              f"{METADATA_FILE} and {VARIABLES_DIR}/; {HOW_TO_MAKE}")
    if not paths.exists(path):
        found = sorted(paths.listdir(directory))
        found = ', '.join(found[:8]) + (f' and {len(found) - 8} more' if len(found) > 8 else '') or 'nothing'
        raise CheckpointError(f"{directory} is not a vitdistill checkpoint: it has no {METADATA_FILE} "
                              f"(found: {found}); {HOW_TO_MAKE}")
    with paths.open_file(path) as f:
        return json.load(f)


def load_variables(directory: str, *, model: str | None = None) -> dict[str, Any]:
    """Restores the variables saved by `save_variables` as numpy arrays (device placement is the caller's).

    With `model`, checks that the checkpoint was written for that model name.
    """
    record = read_metadata(directory)
    if model is not None and record.get('model') != model:
        raise CheckpointError(f"{paths.absolute(directory)} holds variables of model {record.get('model')!r}, "
                              f"not {model!r}: pass the matching model name, or convert the weights for {model!r}")
    path = os.path.join(paths.absolute(directory), VARIABLES_DIR)
    state_checkpoints.quiet_orbax_errors()  # a damaged file: orbax's reader threads report closed event loops
    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            saved = checkpointer.metadata(path).item_metadata
            if saved is None:
                raise CheckpointError(f"no arrays in {path}")
            return checkpointer.restore(path, args=state_checkpoints.as_numpy(saved.tree))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise bare Exceptions for damaged files
            raise CheckpointError(
                f"Cannot read the weights in {paths.absolute(directory)} "
                f"({first_line(state_checkpoints.root_cause(e))}): the folder is damaged or "
                f"incomplete (a copy cut short?). Copy the whole folder again, or re-run the conversion "
                f"({HOW_TO_MAKE}).") from e


NETWORKS = ("auto", "student", "teacher", "ema")  # which network of a training workdir: state fields below
_STATE_FIELDS = {"student": "params", "teacher": "teacher_params", "ema": "ema_params"}


class ModelWeights(NamedTuple):
    variables: dict          # {'params'[, 'batch_stats']}, numpy arrays
    model: Optional[str]     # the model name recorded with them, None if unknown
    description: str         # what they are, for the log: "the teacher of the training workdir DIR at step N"


def read_weights(path: str, network: str = "auto") -> ModelWeights:
    """A model's weights from a convert output (vitdistill.json) or a training workdir (its latest checkpoint,
    whatever mesh or number of processes wrote it; the model name from its config.json).

    `network` picks the network of a workdir: 'auto' is DINO's teacher where the state has one (what DINO's
    evaluations and released weights use) and the trained params otherwise; 'student', 'teacher' (DINO) and
    'ema' (DeiT's model EMA) ask for one. A convert output holds one network: the one chosen at conversion.
    Either path may be remote (gs://...).
    """
    if network not in NETWORKS:
        raise CheckpointError(f"network={network!r}; valid: {', '.join(NETWORKS)}")
    if paths.exists(os.path.join(path, METADATA_FILE)):
        if network not in ("auto", "student"):
            raise CheckpointError(f"{path} is a converted checkpoint, which holds one network; network={network!r} "
                                  "applies to training workdirs (pick the network when converting: --key)")
        return ModelWeights(load_variables(path), read_metadata(path).get('model'), f"the converted checkpoint {path}")
    if paths.isdir(os.path.join(path, state_checkpoints.CHECKPOINTS_DIR)):
        step, raw = state_checkpoints.latest_raw_state(path)
        if network == "auto":
            network = "teacher" if raw.get("teacher_params") else "student"
        field = _STATE_FIELDS[network]
        if not raw.get(field):
            present = [name for name, key in _STATE_FIELDS.items() if raw.get(key)]
            raise CheckpointError(f"the training workdir {path} has no {network} network (its state has: "
                                  f"{', '.join(present)}); pick one of those")
        variables = {'params': raw[field]}
        if raw.get('batch_stats'):
            variables['batch_stats'] = raw['batch_stats']
        model = None
        config_path = os.path.join(path, CONFIG_FILE)
        if paths.exists(config_path):
            try:
                with paths.open_file(config_path) as f:
                    model = (json.load(f).get('model') or {}).get('name')
            except (ValueError, OSError, AttributeError):  # cut short or edited: the caller's name, or none
                model = None
        return ModelWeights(variables, model, f"the {network} of the training workdir {path} at step {step}")
    raise CheckpointError(
        f"No model checkpoint at {path!r}: expected a `python -m vitdistill.convert` output (with "
        f"{METADATA_FILE}) or a training workdir (with {state_checkpoints.CHECKPOINTS_DIR}/).")


def read_variables(path: str, network: str = "auto") -> tuple[dict[str, Any], Optional[str]]:
    """(variables, model name): `read_weights` without the description."""
    weights = read_weights(path, network)
    return weights.variables, weights.model


def place_like(new, like):
    """Host arrays `new` (the same on every process) as global arrays with the dtypes and shardings of the
    arrays `like`."""
    return sharding.place(jax.tree.map(lambda n, o: np.asarray(n, o.dtype), new, like),
                          jax.tree.map(lambda o: o.sharding, like))


def load_pretrained(path: str, like: dict[str, Any], *, network: str = "auto") -> tuple[dict[str, Any], str]:
    """Fine-tuning: the variables at `path` fitted to a fresh model's `like` ({'params'[, 'batch_stats']}, on
    the devices) by `models.fit_params`, and placed as those are; with a line for the log saying what was
    loaded, resampled and kept fresh.

    BatchNorm statistics load where both sides have them; otherwise the fresh ones stay.
    """
    loaded = read_weights(path, network)
    fitted = models.fit_params(loaded.variables['params'], sharding.to_host(like['params']))
    variables = {'params': place_like(fitted.params, like['params'])}
    if like.get('batch_stats'):
        variables['batch_stats'] = (place_like(loaded.variables['batch_stats'], like['batch_stats'])
                                    if loaded.variables.get('batch_stats') else like['batch_stats'])
    report = f"init_from: {loaded.description}: {len(fitted.loaded)} arrays loaded"
    if fitted.resampled:
        report += f", resampled to this model's grid: {', '.join(fitted.resampled)}"
    report += f"; new (fresh init): {', '.join(fitted.fresh) if fitted.fresh else 'none'}"
    if fitted.ignored:
        report += f"; not used: {len(fitted.ignored)} ({', '.join(fitted.ignored[:6])}{', ...' if len(fitted.ignored) > 6 else ''})"
    return variables, report


def vit_backbone(params: dict, what: str) -> tuple[dict, int, int]:
    """(a ViT's params, its patch size, its native image size) from a network's params: a DINO network's
    backbone is taken out, a classifier head kept. `what` names the weights in the error for anything else."""
    params = params.get('backbone', params)
    if 'patch_embed' not in params or 'pos_embed' not in params:
        raise CheckpointError(f"{what} holds no Vision Transformer (top-level arrays: {', '.join(sorted(params))}); "
                              "this needs a ViT / DeiT / DINO backbone")
    patch = int(params['patch_embed']['proj']['kernel'].shape[0])
    prefix = 2 if 'dist_token' in params else 1
    grid = int(round((params['pos_embed'].shape[1] - prefix) ** 0.5))
    return params, patch, grid * patch


def frozen_vit(model_config, *, what: str, dtype=None):
    """(module, params, description) of the ViT backbone at `model_config.init_from` (its `init_from_network`),
    as `model_config.name` with no classifier: for evaluations that freeze it (linear probe, k-NN). `dtype`
    defaults to `model_config.dtype` resolved for the backend; `what` names the evaluation in errors."""
    import jax.numpy as jnp

    if not model_config.init_from:
        raise CheckpointError(f"{what} needs a backbone: --config.model.init_from=DIR (a DINO or DeiT workdir, or a "
                              "`python -m vitdistill.convert` output)")
    loaded = read_weights(model_config.init_from, model_config.init_from_network)
    params, patch, native = vit_backbone(loaded.variables['params'], loaded.description)
    module = models.create(model_config.name, num_classes=0, img_size=native, patch_size=patch,
                           dtype=dtype or models.compute_dtype(model_config.dtype), pos_embed_interpolation='dino')
    if not isinstance(module, models.VisionTransformer):
        raise CheckpointError(f"config.model.name={model_config.name!r} is not a Vision Transformer")
    params = {k: v for k, v in params.items() if k not in ('head', 'head_dist')}
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, native, native, 3))))
    fitted = models.fit_params(params, expected['params'])  # another width or depth: an error naming it
    if fitted.fresh:
        raise CheckpointError(f"{loaded.description} lacks {', '.join(fitted.fresh)} of {model_config.name}; is "
                              "config.model.name the checkpoint's architecture?")
    return module, fitted.params, loaded.description
