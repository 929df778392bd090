"""DeiT's teacher: a frozen classifier over the student's label space, trained first or loaded.

A config either gives `teacher.checkpoint` (a `python -m vitdistill.convert` output, a training
workdir, or "random" for benchmarks and smoke tests) or a `teacher.train` block, a whole config
that `vitdistill.methods.train_and_evaluate` runs first in `workdir/teacher`. Loading never trains.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitdistill import models, weights
from vitdistill.errors import CheckpointError, ConfigError

TEACHER_DIR = "teacher"  # inside the student's workdir, where a teacher.train run goes


class Teacher(NamedTuple):
    name: str
    module: nn.Module
    variables: Any


def teacher_run(config, workdir: str) -> Optional[tuple[Any, str]]:
    """(config, workdir) of the run that trains the teacher first, or None when there is none to run.

    A given checkpoint wins: the teacher.train block only runs without one.
    """
    if config.teacher.train and not config.teacher.checkpoint:
        return config.teacher.train, os.path.join(workdir, TEACHER_DIR)
    return None


def teacher_path(config, workdir: str) -> str:
    run = teacher_run(config, workdir)
    if run is not None:
        return run[1]
    if not config.teacher.checkpoint:
        raise ConfigError(
            f"Distillation kind {config.distill.kind!r} needs a teacher: set --config.teacher.checkpoint=DIR "
            "(a `python -m vitdistill.convert` output or a teacher run's workdir), give the config a "
            "teacher.train block, or use --config.distill.kind=none.")
    return config.teacher.checkpoint


def load_teacher(config, workdir: str, num_classes: int) -> Teacher:
    """The frozen teacher's name, module and variables; a teacher.train run must have finished first.

    The teacher must share the student's label space (`num_classes`) and sees the student's images;
    `teacher.checkpoint="random"` gives randomly initialised weights.
    """
    tconf = config.teacher
    path = teacher_path(config, workdir)
    name = tconf.train.model.name if tconf.train else tconf.model
    size = config.data.image_size
    if path == "random":
        variables, recorded = None, None
    else:
        variables, recorded = weights.read_variables(path)
    name = recorded or name
    overrides = {"num_classes": num_classes}
    if models.is_vit(name):
        overrides["img_size"] = size
    teacher = models.create(name, **overrides)
    example = jnp.zeros((1, size, size, 3))
    if variables is None:
        return Teacher(name, teacher, jax.jit(teacher.init)(jax.random.key(config.seed + 2), example))
    expected = jax.eval_shape(teacher.init, jax.random.key(0), example)
    mismatched = [f"{'/'.join(str(k.key) for k in key_path)}: checkpoint {np.shape(a)}, model {b.shape}"
                  for (key_path, a), b in zip(jax.tree_util.tree_leaves_with_path(variables),
                                              jax.tree.leaves(expected))
                  if np.shape(a) != b.shape] if jax.tree.structure(variables) == jax.tree.structure(expected) \
        else ["the parameter trees differ (another architecture?)"]
    if mismatched:
        raise CheckpointError(f"The teacher checkpoint {path} does not fit {name} with {num_classes} classes "
                              "(the student's label space): " + "; ".join(mismatched[:8]))
    return Teacher(name, teacher, variables)
