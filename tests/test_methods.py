"""The seam between the loop and the methods: a third method, defined here and nowhere in the package, trains,
checkpoints, resumes exactly and evaluates through the same loop; and the package's imports keep the layout
docs/DESIGN.md describes (the loop knows no method; methods share no private names)."""
import ast
import functools
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from ml_collections import ConfigDict

from vitdistill import methods
from vitdistill.data import pipeline, sources
from vitdistill.errors import ConfigError
from vitdistill.evaluate import batched
from vitdistill.evaluate.classify import fractions, topk_correct
from vitdistill.train import loop, optim, schedules, sharding
from vitdistill.train.state import TrainState

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vitdistill")


# ---------------------------------------------------------------------------
# A third method: softmax regression on the raw pixels of scikit-learn's digits, with a running loss in its state.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class PixelState(TrainState):
    loss_average: Any = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))


def pixels(image, seed=None):
    return {"pixels": tf.reshape(tf.cast(image, tf.float32) / 255.0, [-1])}


def init_state(rng, *, tx):
    params = {"kernel": 0.01 * jax.random.normal(rng, (8 * 8 * 3, 10)), "bias": jnp.zeros((10,))}
    return PixelState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def logits(params, features):
    return features @ params["kernel"] + params["bias"]


def train_step(state, batch, frozen, *, tx):
    def loss_fn(params):
        return optax.softmax_cross_entropy_with_integer_labels(logits(params, batch["pixels"]), batch["label"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         loss_average=optim.ema_update(state.loss_average, loss, 0.9)), {"loss": loss}


def build_task(config, workdir):
    train, test = sources.digits("train"), sources.digits("test")
    tx = optax.sgd(config.lr)
    mesh = sharding.make_mesh()

    @jax.jit
    def counts(params, batch):
        result = topk_correct(logits(params, batch["pixels"]), batch["label"], batch["mask"])
        return {**result, "count": jnp.sum(batch["mask"])}

    def evaluate(state, frozen):
        ds, _ = pipeline.eval_dataset(test, pixels, global_batch=config.batch_size)
        return fractions(batched.sum_counts(counts, (state.params,), ds, mesh, source=test,
                                            global_batch=config.batch_size))

    return loop.Task(name="pixels", data=pipeline.TrainData(train, pixels),
                     init=functools.partial(init_state, tx=tx), train_step=functools.partial(train_step, tx=tx),
                     evaluate=evaluate, length=schedules.run_length(config, train.num_examples),
                     summarize=lambda final: f"pixels: top-1 {100 * final['top1']:.2f} %")


PIXELS = type("pixel_regression", (), {"build_task": staticmethod(build_task)})  # a module-like method


def _config(max_steps):
    return ConfigDict({"method": "pixels", "seed": 0, "epochs": 1.0, "max_steps": max_steps, "batch_size": 16,
                       "lr": 0.5, "log_every_steps": 1, "checkpoint_every_steps": 2, "keep_checkpoints": 3,
                       "progress_bar": False})


def _latest(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        return manager.latest_step(), manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())


def test_a_third_method_trains_resumes_exactly_and_evaluates_through_the_loop(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(methods.METHODS, "pixels", PIXELS)
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    final = methods.train_and_evaluate(_config(6), whole)
    methods.train_and_evaluate(_config(3), halves)
    methods.train_and_evaluate(_config(6), halves)
    out = capsys.readouterr().out
    assert "pixels: resuming at step 3/6" in out and f"pixels: top-1 {100 * final['top1']:.2f} %" in out
    (step_a, a), (step_b, b) = _latest(whole), _latest(halves)
    assert step_a == step_b == 6 and final["step"] == 6 and final["count"] == sources.digits("test").num_examples
    assert set(a) == {"step", "params", "opt_state", "batch_stats", "loss_average"}  # the method's own field
    for key in ("params", "loss_average"):
        jax.tree.map(np.testing.assert_array_equal, a[key], b[key])
    with open(os.path.join(whole, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]  # six SGD steps at lr 0.5 learn something
    expected_average = 0.0
    for loss in losses:
        expected_average = 0.9 * expected_average + 0.1 * loss
    assert float(a["loss_average"]) == pytest.approx(expected_average, rel=1e-5)
    assert final["top1"] > 0.3  # chance is 0.1


def test_an_unknown_method_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="config.method='pixels'; valid methods: deit, dino"):
        methods.train_and_evaluate(_config(1), str(tmp_path))


# ---------------------------------------------------------------------------
# The package's import graph.
# ---------------------------------------------------------------------------


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield relative.removesuffix(".__init__"), ast.parse(open(path).read())


def _imports(tree):
    """(module, name or None) for every import; `from a import b` gives ('a', 'b')."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield from ((node.module, alias.name) for alias in node.names)


def _method_module(module, name):
    full = f"{module}.{name}" if name else module
    return full.startswith("vitdistill.methods")


ENTRY_POINTS = {"vitdistill.main", "vitdistill.bench"}


def test_only_the_entry_points_and_the_methods_import_a_method():
    offenders = [(module, f"{imported}{'.' + name if name else ''}")
                 for module, tree in _modules() if not module.startswith("vitdistill.methods")
                 and module not in ENTRY_POINTS
                 for imported, name in _imports(tree) if _method_module(imported, name)]
    assert not offenders, offenders
    assert not [m for m, tree in _modules() if m.startswith("vitdistill.train")
                for imported, name in _imports(tree) if _method_module(imported, name)]


def test_no_method_module_uses_a_private_name_of_another_module():
    offenders = []
    for module, tree in _modules():
        if not module.startswith("vitdistill.methods"):
            continue
        for imported, name in _imports(tree):
            if imported.startswith("vitdistill") and name and name.startswith("_"):
                offenders.append((module, f"from {imported} import {name}"))
        aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("vitdistill") for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_")):
                offenders.append((module, f"{node.value.id}.{node.attr}"))
    assert not offenders, offenders
