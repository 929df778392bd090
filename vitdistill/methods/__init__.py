"""The training methods by the name `config.method` gives them, and `train_and_evaluate`, which runs a config.

A method is a module with `build_task(config, workdir) -> vitdistill.train.loop.Task` and, optionally,
`prerequisites(config, workdir) -> [(config, workdir), ...]`: runs that must finish first (DeiT's
teacher), each run here the same way. Adding one: docs/DESIGN.md, "Adding a method".
"""
from __future__ import annotations

from vitdistill import paths, small_data
from vitdistill.errors import ConfigError
from vitdistill.methods import deit, dino, knn_eval, linear, logreg
from vitdistill.train import loop, state_checkpoints

METHODS = {"deit": deit, "dino": dino, "knn": knn_eval, "linear": linear, "logreg": logreg}


def get(name: str):
    """The method module called `name`."""
    if name not in METHODS:
        raise ConfigError(f"config.method={name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def planned_runs(config, workdir: str) -> list:
    """[(config, workdir), ...]: the runs `train_and_evaluate` makes, prerequisites first."""
    prerequisites = getattr(get(config.method), "prerequisites", None)
    runs = []
    for prerequisite in (prerequisites(config, workdir) if prerequisites else []):
        runs += planned_runs(*prerequisite)
    return runs + [(config, workdir)]


def check(config) -> None:
    """Every check that needs no compute, for one run: the settings all methods share, then the method's own
    (`check(config)`: its config, and its data source's size and classes). Raises the first problem found as
    a `UserError` that names the value and the fix."""
    import jax

    from vitdistill.data import deit_transforms, pipeline

    pipeline.check_batch_divides(config.batch_size, jax.device_count())
    if "data" in config:
        deit_transforms.resize_of(config.data)
        deit_transforms.image_ops_of(config.data)
    method_check = getattr(get(config.method), "check", None)
    if method_check is not None:
        method_check(config)


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs `config` in `workdir` after its prerequisite runs; re-running resumes. Returns the final metrics.

    A small-data recipe is sized to its data first (`small_data.size_to_data`). Every run is checked (`check`)
    before the first one starts, so that a bad student setting is reported before its teacher trains for minutes;
    so is every run's checkpoint directory (`state_checkpoints.check_writable`).
    """
    sized = small_data.size_to_data(config)
    if sized:
        import jax

        if jax.process_index() == 0:
            print(small_data.describe(config, sized), flush=True)
    runs = planned_runs(config, workdir)
    for run_config, _ in runs:
        check(run_config)
    for _, run_workdir in runs:  # a checkpoint that cannot be written, before the teacher trains
        state_checkpoints.check_writable(paths.check_checkpointable(run_workdir))
    result = {}
    for run_config, run_workdir in runs:
        result = loop.run(get(run_config.method).build_task(run_config, run_workdir), run_config, run_workdir)
    return result
