"""A model's variables as a directory: an orbax checkpoint plus `vitdistill.json` saying what it is.

This is the format `python -m vitdistill.convert` writes and eval / fine-tune configs load.
Training-state checkpoints (optimizer, step, ...) are the trainer's business, not this module's.
"""
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vitdistill.errors import CheckpointError

METADATA_FILE = 'vitdistill.json'
VARIABLES_DIR = 'variables'
HOW_TO_MAKE = ("write one with vitdistill.checkpoint.save_variables, or convert an official PyTorch checkpoint: "
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
