"""A model's variables on disk: the directory `python -m vitdistill.convert` writes (an orbax checkpoint plus
`vitdistill.json` saying what it is), and the reading of any model's weights, from such a directory or from
a training workdir, for `init_from`, a DeiT teacher and evaluation.

The training state's own checkpoints (optimiser, step, ...) are `vitdistill.train.state_checkpoints`'.
"""
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from vitdistill import models
from vitdistill.errors import CheckpointError
from vitdistill.train import state_checkpoints
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
    directory = os.path.abspath(directory)
    record = json.dumps({'model': model, **metadata}, indent=2, sort_keys=True)
    os.makedirs(directory, exist_ok=True)
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables, force=True)
    # Written last: a directory with this file holds a complete checkpoint.
    with open(os.path.join(directory, METADATA_FILE), 'w') as f:
        f.write(record + '\n')
    return directory


def read_metadata(directory: str) -> dict[str, Any]:
    """The `vitdistill.json` record of a checkpoint directory (model name and metadata)."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory at {directory}: expected a directory holding "
                              f"{METADATA_FILE} and {VARIABLES_DIR}/; {HOW_TO_MAKE}")
    if not os.path.isfile(path):
        found = sorted(os.listdir(directory))
        found = ', '.join(found[:8]) + (f' and {len(found) - 8} more' if len(found) > 8 else '') or 'nothing'
        raise CheckpointError(f"{directory} is not a vitdistill checkpoint: it has no {METADATA_FILE} "
                              f"(found: {found}); {HOW_TO_MAKE}")
    with open(path) as f:
        return json.load(f)


def load_variables(directory: str, *, model: str | None = None) -> dict[str, Any]:
    """Restores the variables saved by `save_variables` as numpy arrays (device placement is the caller's).

    With `model`, checks that the checkpoint was written for that model name.
    """
    record = read_metadata(directory)
    if model is not None and record.get('model') != model:
        raise CheckpointError(f"{os.path.abspath(directory)} holds variables of model {record.get('model')!r}, "
                              f"not {model!r}: pass the matching model name, or convert the weights for {model!r}")
    path = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def read_variables(path: str) -> tuple[dict[str, Any], Optional[str]]:
    """(variables, model name) from a convert output (vitdistill.json) or a training workdir (the `params` and
    `batch_stats` of its latest checkpoint; the model name from its config.json, None without one).

    Either may be remote (gs://...).
    """
    from tensorflow.io import gfile  # imported here: convert, which saves, should not wait for TensorFlow

    if gfile.exists(os.path.join(path, METADATA_FILE)):
        return load_variables(path), read_metadata(path).get('model')
    if gfile.isdir(os.path.join(path, state_checkpoints.CHECKPOINTS_DIR)):
        _, raw = state_checkpoints.latest_raw_state(path)
        variables = {'params': raw['params']}
        if raw.get('batch_stats'):
            variables['batch_stats'] = raw['batch_stats']
        model = None
        config_path = os.path.join(path, CONFIG_FILE)
        if gfile.exists(config_path):
            with gfile.GFile(config_path) as f:
                model = json.load(f).get('model', {}).get('name')
        return variables, model
    raise CheckpointError(
        f"No model checkpoint at {path!r}: expected a `python -m vitdistill.convert` output (with "
        f"{METADATA_FILE}) or a training workdir (with {state_checkpoints.CHECKPOINTS_DIR}/).")


def place_like(new, like):
    """Host arrays `new` on the devices, with the dtypes and shardings of the arrays `like`."""
    return jax.tree.map(lambda n, o: jax.device_put(np.asarray(n, o.dtype), o.sharding), new, like)


def load_pretrained(path: str, like: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning: the variables at `path` fitted to a fresh model's `like` ({'params'[, 'batch_stats']}, on
    the devices) by `models.adapt_params`, and placed as those are.

    BatchNorm statistics load where both sides have them; otherwise the fresh ones stay.
    """
    loaded, _ = read_variables(path)
    fitted = {'params': place_like(models.adapt_params(loaded['params'], jax.device_get(like['params'])),
                                   like['params'])}
    if like.get('batch_stats'):
        fitted['batch_stats'] = (place_like(loaded['batch_stats'], like['batch_stats'])
                                 if loaded.get('batch_stats') else like['batch_stats'])
    return fitted
