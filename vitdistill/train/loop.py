"""One training loop for DeiT and DINO: they differ only in the `Task` they hand to it.

A task supplies the state's initialiser, the pure train step, the data transform and its
evaluation; the loop owns the mesh, the jitted step with explicit shardings and a donated
state, the data stream, checkpoints (resume is automatic), metrics, and the stop on a
non-finite loss.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from vitdistill.errors import ConfigError, UserError
from vitdistill.data import pipeline
from vitdistill.data.sources import Source
from vitdistill.train import sharding
from vitdistill.train.checkpointing import Checkpointer
from vitdistill.train.reporting import Reporter, save_config
from vitdistill.train.state import TrainState


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; training stopped before saving the bad state."""


@dataclasses.dataclass
class Task:
    """What a method (DeiT, DINO) gives the loop."""

    name: str
    train_source: Source
    train_transform: Callable            # (uint8 image, seed) -> {view: float32}
    init: Callable[[jax.Array], TrainState]  # pure; jitted by the loop
    train_step: Callable                 # (state, batch, frozen) -> (state, metrics); pure
    evaluate: Callable[[TrainState], dict]   # host-side: runs its own eval data through jitted fns
    steps_per_epoch: int
    total_steps: int
    eval_every_steps: int                # 0: only at the end
    frozen: Any = None                   # replicated inputs that are not trained or saved (DeiT's teacher)
    repeats: int = 1
    prepare_state: Optional[Callable[[TrainState], TrainState]] = None  # a fresh state's weights from a checkpoint
    check_metrics: Optional[Callable[[int, dict], Optional[str]]] = None  # returns a warning, or None
    summarize: Optional[Callable[[dict], str]] = None
    metadata: dict = dataclasses.field(default_factory=dict)


def steps_for(config, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): an epoch is one pass over `num_examples` at the global batch.

    `epochs = 0` means no training: the run only evaluates (a converted checkpoint, say).
    """
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {num_examples} training examples; "
                         "lower --config.batch_size")
    total = int(round(config.epochs * steps_per_epoch))
    if config.get("max_steps"):
        total = min(total, int(config.max_steps))
    return steps_per_epoch, max(total, 1) if config.epochs > 0 else 0


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(f"signal {signum}")


def _replicated_like(tree, mesh):
    rep = sharding.replicated(mesh)
    return jax.tree.map(lambda _: rep, tree)


def _finite_or_raise(step: int, metrics: dict, workdir: str, last_saved: Optional[int]):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        where = (f"the last good checkpoint is step {last_saved} in {workdir}/checkpoints (re-running the same "
                 "command resumes from it)") if last_saved is not None else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"Loss is {loss} at step {step}; stopped without saving that state ({where}). Lower "
            "--config.optim.lr, enable gradient clipping (--config.optim.clip_grad), use float32 "
            "(--config.model.dtype=float32), or check the data for bad images/labels.")


def _initial_state(task: Task, config, checkpointer: Checkpointer, state_shardings, abstract):
    """The latest checkpoint's state, or a fresh one (with pretrained weights if the task loads any)."""
    if checkpointer.latest_step() is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                              state_shardings)
        return checkpointer.restore(target), True
    state = jax.jit(task.init, out_shardings=state_shardings)(jax.random.key(config.seed))
    return (task.prepare_state(state) if task.prepare_state is not None else state), False


def run(task: Task, config, workdir: str) -> dict:
    """Trains `task` in `workdir` (resuming if a checkpoint is there), evaluates, returns the final metrics."""
    workdir = local_or_remote(workdir)
    mesh = sharding.make_mesh()
    pipeline.check_batch_size(config.batch_size, jax.device_count(), task.train_source.num_examples,
                              task.train_source.name)
    save_config(config, workdir)
    abstract = jax.eval_shape(task.init, jax.random.key(config.seed))
    state_shardings = _replicated_like(abstract, mesh)
    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints)
    state, resumed = _initial_state(task, config, checkpointer, state_shardings, abstract)
    step = int(jax.device_get(state.step))
    frozen = sharding.replicate(task.frozen, mesh) if task.frozen is not None else None
    step_fn = jax.jit(task.train_step,
                      in_shardings=(state_shardings, sharding.batch_sharded(mesh), _replicated_like(frozen, mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))
    reporter = Reporter(workdir, total_steps=task.total_steps, start_step=step, global_batch=config.batch_size,
                        progress_bar=config.progress_bar, name=task.name)
    if resumed:
        reporter.message(f"{task.name}: resuming at step {step}/{task.total_steps} from {workdir}")
    last_saved = step if resumed else None
    metrics = None
    previous = signal.signal(signal.SIGTERM, _raise_stop) if _main_thread() else None
    try:
        if step < task.total_steps:
            batches = pipeline.train_dataset(
                task.train_source, task.train_transform, seed=config.seed, global_batch=config.batch_size,
                start_step=step, process_index=jax.process_index(), process_count=jax.process_count(),
                repeats=task.repeats).as_numpy_iterator()
            reporter.throughput(step)
        while step < task.total_steps:
            batch = sharding.to_global(_next_batch(batches, task, step, config), mesh)
            state, metrics = step_fn(state, batch, frozen)
            step += 1
            is_last = step == task.total_steps
            if step % config.log_every_steps == 0 or is_last:
                _log(task, reporter, step, sharding.to_host(metrics), workdir, last_saved)
            else:
                reporter.advance(step)
            if is_last or step % checkpointer.every_steps == 0:
                _finite_or_raise(step, sharding.to_host(metrics), workdir, last_saved)
                if checkpointer.maybe_save(step, state, force=is_last):
                    last_saved = step
            if task.eval_every_steps and step % task.eval_every_steps == 0 and not is_last:
                reporter.write(step, task.evaluate(state), split="eval")
        final = {**task.evaluate(state), "step": step}
        reporter.write(step, final, split="eval")
    except (KeyboardInterrupt, _Stop) as stop:
        if metrics is not None and step > (last_saved or 0) and math.isfinite(float(sharding.to_host(metrics)["loss"])):
            checkpointer.maybe_save(step, state, force=True)
            reporter.message(f"{task.name}: interrupted ({stop or 'Ctrl-C'}); saved step {step}. "
                             "Re-run the same command to resume.")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        checkpointer.close()  # waits for asynchronous saves: nothing started is lost, whatever happened
        reporter.close()
    if task.summarize is not None and jax.process_index() == 0:
        print(task.summarize(final), flush=True)
    return final


def _log(task: Task, reporter: Reporter, step: int, host: dict, workdir: str, last_saved):
    """Checks the loss, then writes the step's metrics with throughput and epoch, and any task warning."""
    _finite_or_raise(step, host, workdir, last_saved)
    host.update(reporter.throughput(step))
    host["epoch"] = step / task.steps_per_epoch
    reporter.write(step, host)
    reporter.advance(step, {"loss": float(host["loss"]), "img/s": round(host.get("images_per_sec", 0.0), 1)})
    if task.check_metrics is not None and (warning := task.check_metrics(step, host)):
        reporter.message(warning)


METHODS = ("deit", "dino")


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs the method `config.method` names in `workdir`; re-running resumes. Returns the final metrics."""
    if config.method == "deit":
        from vitdistill.train import deit_step as method
    elif config.method == "dino":
        from vitdistill.train import dino_step as method
    else:
        raise ConfigError(f"config.method={config.method!r}; valid methods: {', '.join(METHODS)}")
    return run(method.build_task(config, workdir), config, workdir)


def local_or_remote(path: str) -> str:
    """An absolute local path, or a remote one (gs://...) as given: orbax and tf.io.gfile read both."""
    return path if "://" in path else os.path.abspath(path)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _next_batch(batches, task: Task, step: int, config) -> dict:
    try:
        return next(batches)
    except Exception as e:  # tf.errors.* from decoding a bad file, mostly
        import tensorflow as tf

        if isinstance(e, tf.errors.InvalidArgumentError):
            raise pipeline.BadImageError(
                f"Could not decode an image of {task.train_source.name} for step {step}: {e.message.splitlines()[0]}"
                f". It is one of: {pipeline.batch_examples(task.train_source, step, config, task.repeats, jax.process_index(), jax.process_count())}. Remove or replace the corrupt "
                "file(s) and re-run the same command to resume.") from e
        raise


def evaluate_in_batches(eval_fn, state_args, dataset, mesh, *, source: Optional[Source] = None,
                        global_batch: int = 0) -> dict:
    """Sums a jitted eval function's per-batch counts over a padded eval dataset.

    With `source` and `global_batch`, an undecodable image stops it naming the batch's files.
    """
    import tensorflow as tf

    totals = None
    batches = dataset.as_numpy_iterator()
    for index in itertools.count():
        try:
            local = next(batches)
        except StopIteration:
            break
        except tf.errors.InvalidArgumentError as e:
            names = (pipeline.eval_batch_examples(source, index, global_batch, jax.process_index(),
                                                  jax.process_count()) if source is not None else ["?"])
            raise pipeline.BadImageError(
                f"Could not decode an image of {source.name if source else 'the evaluation data'}: "
                f"{e.message.splitlines()[0]}. It is one of: {names}. Remove or replace the corrupt file(s).") from e
        counts = eval_fn(*state_args, sharding.to_global(local, mesh))
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    return {k: float(v) for k, v in sharding.to_host(totals).items()} if totals is not None else {}

