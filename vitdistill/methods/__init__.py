"""The training methods by the name `config.method` gives them, and `train_and_evaluate`, which runs a config.

A method is a module with `build_task(config, workdir) -> vitdistill.train.loop.Task` and, optionally,
`prerequisites(config, workdir) -> [(config, workdir), ...]`: runs that must finish first (DeiT's
teacher), each run here the same way. Adding one: docs/DESIGN.md, "Adding a method".
"""
from __future__ import annotations

from vitdistill.errors import ConfigError
from vitdistill.methods import deit, dino, knn_eval, linear, logreg
from vitdistill.train import loop

METHODS = {"deit": deit, "dino": dino, "knn": knn_eval, "linear": linear, "logreg": logreg}


def get(name: str):
    """The method module called `name`."""
    if name not in METHODS:
        raise ConfigError(f"config.method={name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs `config` in `workdir` after its prerequisite runs; re-running resumes. Returns the final metrics."""
    method = get(config.method)
    prerequisites = getattr(method, "prerequisites", None)
    for prerequisite_config, prerequisite_workdir in (prerequisites(config, workdir) if prerequisites else []):
        train_and_evaluate(prerequisite_config, prerequisite_workdir)
    return loop.run(method.build_task(config, workdir), config, workdir)
