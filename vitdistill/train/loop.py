"""The training loop: one for every method, which hands it a `Task` and knows nothing else of it.

The loop owns the mesh, the jitted step with explicit shardings and a donated state, the data
stream (exactly resumable), the training-state checkpoints (resume is automatic), metrics, the stop
on a non-finite loss, and what happens on Ctrl-C or SIGTERM. It imports no method.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from absl import logging

from vitdistill import paths
from vitdistill.data import SIZE_CHECK, pipeline, size_check_text
from vitdistill.errors import BadImageError, DataError, EvalStopped, NonFiniteLossError, Preempted, StoppedAtOnce
from vitdistill.train import optim, sharding
from vitdistill.train import preemption
from vitdistill.train.preemption import StopRequests
from vitdistill.train.reporting import CONFIG_FILE, Reporter, save_config
from vitdistill.train.schedules import RunLength
from vitdistill.train.state_checkpoints import StateCheckpoints


@dataclasses.dataclass(frozen=True)
class Task:
    """What a method gives the loop for one config.

    `init` and `train_step` are pure (the loop jits them); the state is any pytree with a `step`
    (a `vitdistill.train.state.TrainState` subclass), saved and restored as a whole. `frozen` is
    an input of every step that is neither trained nor saved (DeiT's teacher, a probe's backbone), sharded
    as the state is; the loop places it on the mesh once and hands the placed copy to `evaluate` as well.
    """

    name: str
    data: pipeline.TrainData
    init: Callable[[jax.Array], Any]                  # rng -> state
    train_step: Callable                              # (state, batch, frozen) -> (state, metrics with 'loss')
    evaluate: Callable[[Any, Any], dict]              # (state, frozen) -> metrics (host-side; own eval data)
    length: RunLength
    eval_every_steps: int = 0                         # 0: only at the end
    frozen: Any = None
    prepare_state: Optional[Callable[[Any], Any]] = None   # a fresh (not resumed) state -> state
    check_metrics: Optional[Callable[[int, dict], Optional[str]]] = None  # (step, host metrics) -> a warning
    summarize: Optional[Callable[[dict], str]] = None  # final metrics -> what process 0 prints at the end


def evaluation_task(name: str, *, source, transform: Callable, evaluate: Callable, length: RunLength, frozen,
                    summarize: Optional[Callable[[dict], str]] = None) -> Task:
    """A task that trains nothing (k-NN, logistic regression): an empty state, a step that does nothing, and
    everything in `evaluate(state, frozen)`; `source` and `transform` (image -> example) are never read."""
    from vitdistill.train.state import TrainState

    def init(rng):
        del rng
        return TrainState(step=jnp.zeros((), jnp.int32), params={}, opt_state={})

    return Task(name=name, data=pipeline.TrainData(source, lambda image, seed: transform(image)), init=init,
                train_step=lambda state, batch, frozen: (state, {"loss": jnp.zeros(())}), evaluate=evaluate,
                length=length, frozen=frozen, summarize=summarize)


def state_layout(task: Task, mesh, seed: int):
    """(abstract state, its shardings): shapes from `jax.eval_shape(task.init)`, large arrays sharded over the
    mesh's fsdp axis (`sharding.state_shardings`)."""
    abstract = jax.eval_shape(task.init, jax.random.key(seed))
    return abstract, sharding.state_shardings(abstract, mesh)


def init_state(task: Task, shardings, seed: int):
    """A fresh state, created directly with its shardings."""
    return jax.jit(task.init, out_shardings=shardings)(jax.random.key(seed))


def place_frozen(task: Task, mesh):
    """The task's frozen inputs on the mesh, sharded as a state would be (None if it has none)."""
    if task.frozen is None:
        return None
    return sharding.place_sharded(task.frozen, mesh)


def jit_train_step(task: Task, mesh, state_shardings, frozen, *, skip_nonfinite: bool = False):
    """The task's step as the loop runs it: explicit shardings (the frozen inputs' as placed), the state
    donated. `skip_nonfinite`: `skipping_nonfinite(task.train_step)`, with its counters as a fourth
    argument and a third result."""
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    ins = (state_shardings, sharding.batch_sharded(mesh), frozen_shardings)
    outs = (state_shardings, sharding.replicated(mesh))
    if skip_nonfinite:
        return jax.jit(skipping_nonfinite(task.train_step), in_shardings=ins + (sharding.replicated(mesh),),
                       out_shardings=outs + (sharding.replicated(mesh),), donate_argnums=(0, 3))
    return jax.jit(task.train_step, in_shardings=ins, out_shardings=outs, donate_argnums=(0,))


def skip_counters() -> dict:
    """The counters `skipping_nonfinite` carries: skipped in a row now, the longest such run, in all."""
    return {"in_a_row": jnp.zeros((), jnp.int32), "longest": jnp.zeros((), jnp.int32), "total": jnp.zeros((), jnp.int32)}


def skipping_nonfinite(train_step):
    """A step that keeps the state it was given when the update is not finite (a NaN or infinite loss, or a
    non-finite array in the new state), only counting the step on, and the optimizer's schedule counts
    (`optim.keep_schedule_counts`): (state, batch, frozen, counters) ->
    (state, metrics, counters). The metrics gain `skipped` (this step) and the counters."""

    def step(state, batch, frozen, counters):
        new_state, metrics = train_step(state, batch, frozen)
        leaves = [x for x in jax.tree.leaves(new_state) if jnp.issubdtype(x.dtype, jnp.inexact)]
        ok = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        # the step counts on, and the optimizer's schedules with it (lr, decay, freezing: indexed by iteration)
        kept = kept.replace(step=new_state.step,
                            opt_state=optim.keep_schedule_counts(kept.opt_state, new_state.opt_state))
        in_a_row = jnp.where(ok, 0, counters["in_a_row"] + 1)
        counters = {"in_a_row": in_a_row, "longest": jnp.maximum(counters["longest"], in_a_row),
                    "total": counters["total"] + (~ok).astype(jnp.int32)}
        return kept, {**metrics, "skipped": ~ok, **{f"skipped_{k}": v for k, v in counters.items()}}, counters

    return step


def _last_good(workdir: str, last_saved: Optional[int]) -> str:
    return (f"the last good checkpoint is step {last_saved} in {workdir}/checkpoints (re-running the same "
            "command resumes from it)") if last_saved is not None else "no checkpoint was saved yet"


def _finite_or_raise(step: int, metrics: dict, workdir: str, last_saved: Optional[int], skip_limit: int = 0):
    """Stops on a non-finite loss; with skipping (`skip_limit` > 0) only once `skip_limit` steps in a row
    were skipped (their updates were not applied, so the state stays good)."""
    if skip_limit:
        longest = int(metrics["skipped_longest"])
        if longest >= skip_limit:
            raise NonFiniteLossError(
                f"{longest} steps in a row had a non-finite loss or update and were skipped (the limit is "
                f"--config.skip_nonfinite_steps={skip_limit}; {int(metrics['skipped_total'])} skipped in all, seen "
                f"at step {step}); stopped ({_last_good(workdir, last_saved)}). Lower --config.optim.lr, enable "
                "gradient clipping (--config.optim.clip_grad), use float32 (--config.model.dtype=float32), or "
                "check the data for bad images/labels.")
        return
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        where = _last_good(workdir, last_saved)
        raise NonFiniteLossError(
            f"Loss is {loss} at step {step}; stopped without saving that state ({where}). Lower "
            "--config.optim.lr, enable gradient clipping (--config.optim.clip_grad), use float32 "
            "(--config.model.dtype=float32), or check the data for bad images/labels.")


@jax.jit
def _non_finite_leaves(state) -> dict:
    """{path: True if that floating array holds a NaN or an infinity} over the state."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): ~jnp.all(jnp.isfinite(x)) for path, x in flat
            if jnp.issubdtype(x.dtype, jnp.inexact)}


def _state_finite_or_raise(step: int, state, workdir: str, last_saved: Optional[int]):
    """Before a save: a state whose loss was finite may still hold non-finite values after its update (an
    update of inf, an overflow in the optimiser's moments); such a state is never saved."""
    bad = sorted(path for path, flag in sharding.to_host(_non_finite_leaves(state)).items() if flag)
    if bad:
        where = _last_good(workdir, last_saved)
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteLossError(
            f"The update at step {step} left {len(bad)} non-finite arrays in the state ({shown}); stopped "
            f"without saving it ({where}). Lower --config.optim.lr, enable gradient clipping "
            "(--config.optim.clip_grad), use float32 (--config.model.dtype=float32), or check the data.")


def _check_same_run(config, workdir: str) -> str:
    """Refuses, before anything in `workdir` is written, a config of another method or model than the run
    whose config.json is there; returns that run's description ('' for a fresh workdir)."""
    import json

    from tensorflow.io import gfile

    from vitdistill.errors import ConfigError

    path = os.path.join(workdir, CONFIG_FILE)
    if not gfile.exists(path):
        return ""
    try:
        with gfile.GFile(path) as f:
            saved = json.load(f)
    except (ValueError, OSError):
        return ""  # unreadable (a run killed while writing it): the checkpoints' shapes still decide
    mine = {"method": config.get("method"), "model": config.get("model", {}).get("name")}
    theirs = {"method": saved.get("method"), "model": (saved.get("model") or {}).get("name")}
    differ = [f"{key} {theirs[key]!r} there, {mine[key]!r} here" for key in mine
              if theirs[key] is not None and mine[key] is not None and theirs[key] != mine[key]]
    if differ:
        raise ConfigError(f"--workdir={workdir} holds another run ({'; '.join(differ)}; its config is {path}). "
                          "Resume it with its own config, or give this run another --workdir.")
    return f"written by a {theirs['method']} run of {theirs['model']}"


def _initial_state(task: Task, config, checkpoints: StateCheckpoints, state_shardings, abstract):
    """The latest checkpoint's state, or a fresh one (with pretrained weights if the task loads any)."""
    if checkpoints.latest_step() is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                              state_shardings)
        return checkpoints.restore(target), True
    state = init_state(task, state_shardings, config.seed)
    return (task.prepare_state(state) if task.prepare_state is not None else state), False


def run(task: Task, config, workdir: str) -> dict:
    """Trains `task` in `workdir` (resuming if a checkpoint is there), evaluates, returns the final metrics.

    `config` supplies the run's settings that every method shares: seed, batch_size, log_every_steps,
    checkpoint_every_steps, keep_checkpoints, progress_bar, mesh. SIGTERM or Ctrl-C, whenever they arrive,
    stop the run at the next step boundary with a checkpoint: `errors.Preempted` says where.
    """
    with preemption.during_run() as stops:
        return _run(task, config, paths.check_checkpointable(workdir), stops)


def _run(task: Task, config, workdir: str, stops: StopRequests) -> dict:
    mesh = sharding.make_mesh(config.get("mesh"))
    source = task.data.source
    total_steps = task.length.total_steps
    pipeline.check_batch_size(config.batch_size, jax.device_count(), source.num_examples, source.name)
    saved_run = _check_same_run(config, workdir)
    abstract, state_shardings = state_layout(task, mesh, config.seed)
    checkpoints = StateCheckpoints(workdir, every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints)
    checkpoints.check_fits(abstract, saved_run=saved_run)
    save_config(config, workdir)  # only once the workdir is known to hold this run (or nothing)
    try:
        state, resumed = _initial_state(task, config, checkpoints, state_shardings, abstract)
    except EvalStopped as e:  # during the evaluation of the network at initialisation (`knn.before_training`)
        raise Preempted(f"{task.name}: {e} (of the network at initialisation) at step 0/{total_steps}; "
                        f"{_where_saved(None, workdir)}. Re-run the same command to resume.", 0) from None
    step = int(jax.device_get(state.step))
    frozen = place_frozen(task, mesh)
    skip_limit = int(config.get("skip_nonfinite_steps") or 0)
    if skip_limit < 0:
        from vitdistill.errors import ConfigError

        raise ConfigError(f"config.skip_nonfinite_steps={skip_limit}; use 0 (stop at the first non-finite loss) or "
                          "N >= 1 (skip such steps, stop after N in a row)")
    step_fn = jit_train_step(task, mesh, state_shardings, frozen, skip_nonfinite=bool(skip_limit))
    counters = sharding.place_sharded(skip_counters(), mesh) if skip_limit else None
    reporter = Reporter(workdir, total_steps=total_steps, start_step=step, global_batch=config.batch_size,
                        progress_bar=config.progress_bar, name=task.name)
    if resumed:
        reporter.message(f"{task.name}: resuming at step {step}/{total_steps} from {workdir}")
    if source.note:
        reporter.message(f"{task.name}: warning: {source.note}")
    skipped_list = _write_skipped(source, workdir)
    last_saved = step if resumed else None
    metrics = None
    batches = None
    stops.in_training_steps = True
    try:
        while step < total_steps:
            if stops.should_stop():
                last_saved = _save_before_stopping(checkpoints, step, state, metrics, last_saved)
                raise Preempted(f"{task.name}: stopped by {stops.reason} at step {step}/{total_steps}; "
                                f"{_where_saved(last_saved, workdir)}. Re-run the same command to resume.", step)
            if batches is None:  # built only once the first step is known to run
                batches = OnMesh(pipeline.train_dataset(
                    source, task.data.transform, seed=config.seed, global_batch=config.batch_size, start_step=step,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    num_shards=mesh.devices.size, repeats=task.data.repeats,
                    keep_partial=task.data.keep_partial).as_numpy_iterator(),
                    task.data, config, mesh, step)
                reporter.throughput(step)
            checkpoints.check()  # a failed asynchronous save stops the run here, before it trains on
            logs = (step + 1) % config.log_every_steps == 0 or step + 1 == total_steps
            saves = (step + 1) % checkpoints.every_steps == 0 or step + 1 == total_steps
            with jax.transfer_guard_device_to_host("allow" if logs or saves else STEP_TRANSFER_GUARD):
                batch = batches.take(step)
                if skip_limit:
                    state, metrics, counters = step_fn(state, batch, frozen, counters)
                else:
                    state, metrics = step_fn(state, batch, frozen)
                if step + 1 < total_steps:
                    batches.load_next()  # the next batch is read and placed while this step runs
                step += 1
                if not logs:
                    reporter.advance(step)
            is_last = step == total_steps
            if logs:
                _log(task, reporter, step, sharding.to_host(metrics), workdir, last_saved, skip_limit)
            if saves:
                _finite_or_raise(step, sharding.to_host(metrics), workdir, last_saved, skip_limit)
                _state_finite_or_raise(step, state, workdir, last_saved)
                if checkpoints.maybe_save(step, state, force=is_last):
                    last_saved = step
            if task.eval_every_steps and step % task.eval_every_steps == 0 and not is_last:
                reporter.write(step, task.evaluate(state, frozen), split="eval")
        final = {**task.evaluate(state, frozen), "step": step}
        reporter.write(step, final, split="eval")
    except EvalStopped as e:  # during an evaluation between steps, or the last one: keep the step it evaluated
        last_saved = _save_before_stopping(checkpoints, step, state, metrics, last_saved)
        raise Preempted(f"{task.name}: {e} at step {step}/{total_steps}; {_where_saved(last_saved, workdir)}. "
                        "Re-run the same command to resume" + (" (and evaluate)." if step == total_steps else "."),
                        step) from None
    except KeyboardInterrupt:  # a second Ctrl-C: save what is finished if it can be, then stop at once
        try:  # the state's own step: the interrupt may have come between the update and `step += 1`
            last_saved = _save_before_stopping(checkpoints, int(jax.device_get(state.step)), state, metrics,
                                               last_saved)
        except Exception as e:  # noqa: BLE001 - mid-update (donated) state: keep the last regular checkpoint
            logging.warning("no checkpoint at step %d after a second Ctrl-C (%s); the last saved one stays", step, e)
        raise StoppedAtOnce(f"{task.name}: stopped at once by a second Ctrl-C at step {step}/{total_steps}; "
                            f"{_where_saved(last_saved, workdir)}. Re-run the same command to resume.",
                            step) from None
    finally:
        stops.in_training_steps = False
        checkpoints.close()  # waits for asynchronous saves: nothing started is lost, whatever happened
        reporter.close()
    if jax.process_index() == 0 and os.environ.get("VITDISTILL_CURVES", "1") != "0":
        _plot_curves(workdir, config)
    if task.summarize is not None:
        try:
            summary = task.summarize(final)  # on every process: a summary may evaluate, which is collective
        except EvalStopped as e:
            raise Preempted(f"{task.name}: {e} (the summary's) after the last step; "
                            f"{_where_saved(step, workdir)}. Re-run the same command to print it.", step) from None
        if jax.process_index() == 0:
            print(summary, flush=True)
    if skipped_list and jax.process_index() == 0:
        print(f"{task.name}: {len(source.skipped)} image(s) of {source.name} that do not decode were left out "
              f"(data.skip_bad_images); they are listed in {skipped_list}", flush=True)
    return final


def _write_skipped(source, workdir: str) -> Optional[str]:
    """`workdir/skipped_images.txt`, one 'path<TAB>reason' line per image the source left out; its path."""
    if not source.skipped:
        return None
    from tensorflow.io import gfile

    path = os.path.join(workdir, "skipped_images.txt")
    if jax.process_index() == 0:
        with gfile.GFile(path, "w") as f:
            f.write("".join(f"{file}\t{reason}\n" for file, reason in source.skipped))
    return path


def _plot_curves(workdir: str, config) -> None:
    """`workdir/curves.png` from metrics.jsonl; a run never fails for its plot."""
    from vitdistill import plot

    try:
        plot.plot(workdir, out_dim=config.get("model", {}).get("out_dim"), global_batch=config.get("batch_size"))
    except Exception as e:  # noqa: BLE001 - no matplotlib backend, a read-only workdir...: say so, go on
        logging.warning("no training curves for %s: %s", workdir, e)


def _where_saved(last_saved: Optional[int], workdir: str) -> str:
    return (f"step {last_saved} is saved in {workdir}/checkpoints" if last_saved is not None
            else "nothing was trained yet, so nothing was saved")


def _save_before_stopping(checkpoints: StateCheckpoints, step: int, state, metrics, last_saved) -> Optional[int]:
    """Saves `state` at `step` unless it is saved already or its last loss was not finite; the last saved step."""
    if metrics is not None and step > (last_saved or 0) and math.isfinite(float(sharding.to_host(metrics)["loss"])):
        if any(sharding.to_host(_non_finite_leaves(state)).values()):
            return last_saved  # stopping anyway: keep the last good checkpoint
        checkpoints.maybe_save(step, state, force=True)
        return step
    return last_saved


def _log(task: Task, reporter: Reporter, step: int, host: dict, workdir: str, last_saved, skip_limit: int = 0):
    """Checks the loss, then writes the step's metrics with throughput and epoch, and any task warning. A
    skipped step (`skip_nonfinite_steps`) is said in a line instead, its non-finite figures not written."""
    _finite_or_raise(step, host, workdir, last_saved, skip_limit)
    if skip_limit and bool(host.pop("skipped")):
        reporter.message(f"{task.name}: step {step}: non-finite loss or update, skipped ({int(host['skipped_in_a_row'])} "
                         f"in a row, {int(host['skipped_total'])} in all; the limit is {skip_limit} in a row)")
        reporter.advance(step)
        return
    host.update(reporter.throughput(step))
    host["epoch"] = step / task.length.steps_per_epoch
    reporter.write(step, host)
    reporter.advance(step, {"loss": float(host["loss"]), "img/s": round(host.get("images_per_sec", 0.0), 1)})
    if task.check_metrics is not None and (warning := task.check_metrics(step, host)):
        reporter.message(warning)


# What a step that neither logs nor saves may transfer from the devices to the host: nothing, so that the host
# never waits for the devices between such steps. "allow" (the default) lets it be; VITDISTILL_STEP_TRANSFER_GUARD=
# "log" names every transfer that happens there, "disallow" makes each one an error (tests/test_train.py).
STEP_TRANSFER_GUARD = os.environ.get("VITDISTILL_STEP_TRANSFER_GUARD", "allow")


class OnMesh:
    """Training batches placed on the mesh one step ahead: `take(step)` hands over the batch placed for `step`
    (reading it now if it is not), and `load_next()`, called once the step is dispatched, reads and places the
    following one while the devices compute. A batch that failed to read raises when its own step takes it."""

    def __init__(self, batches, data: pipeline.TrainData, config, mesh, step: int):
        self._batches, self._data, self._config, self._mesh = batches, data, config, mesh
        self._next_step = step
        self._loaded = None  # (step, placed batch or the exception reading it raised)

    def _load(self):
        step = self._next_step
        try:
            self._loaded = (step, sharding.to_global(_next_batch(self._batches, self._data, step, self._config),
                                                     self._mesh))
        except Exception as e:  # noqa: BLE001 - raised again by take(), at its own step
            self._loaded = (step, e)
        self._next_step += 1

    def take(self, step: int) -> dict:
        if self._loaded is None:
            self._load()
        loaded_step, batch = self._loaded
        self._loaded = None
        assert loaded_step == step, (loaded_step, step)
        if isinstance(batch, Exception):
            raise batch
        return batch

    def load_next(self):
        if self._loaded is None:
            self._load()


def _next_batch(batches, data: pipeline.TrainData, step: int, config) -> dict:
    try:
        return next(batches)
    except Exception as e:  # tf.errors.* from decoding a bad file, mostly
        import tensorflow as tf

        if isinstance(e, tf.errors.InvalidArgumentError) and SIZE_CHECK in e.message:
            raise DataError(f"{data.source.name}, for step {step}: {size_check_text(e.message)}") from e
        if isinstance(e, tf.errors.InvalidArgumentError):
            suspects = pipeline.batch_examples(data.source, step, config, data.repeats, jax.process_index(),
                                               jax.process_count(), jax.device_count(),
                                               keep_partial=data.keep_partial)
            raise BadImageError(
                f"Could not decode an image of {data.source.name} for step {step}: {e.message.splitlines()[0]}"
                f". It is one of: {suspects}. Remove or replace the corrupt file(s) and re-run the same command "
                "to resume." + (" --config.data.scan_images=True lists every bad image of the folder before "
                                "training; --config.data.skip_bad_images=True trains without them."
                                if data.source.name.startswith("folder:") else "")) from e
        raise
