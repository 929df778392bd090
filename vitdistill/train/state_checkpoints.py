"""The training state's checkpoints in `workdir/checkpoints` (orbax): what resuming restores.

A model's weights alone, in the format `python -m vitdistill.convert` writes and `init_from` /
`teacher.checkpoint` read, are `vitdistill.weights`' business; this module is the trainer's.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vitdistill import paths
from vitdistill.errors import CheckpointError, CheckpointSaveError, first_line

CHECKPOINTS_DIR = "checkpoints"  # inside a workdir
_ITEM = "default"  # orbax's name for the single item of each step


class StateCheckpoints:
    """Saves every `every_steps` and at the end, keeps the last `keep`, restores the latest."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(workdir, CHECKPOINTS_DIR)
        self.every_steps = max(1, int(every_steps))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        quiet_orbax_errors()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())
        self._saving: Optional[int] = None  # the step of the save last started
        self._failed: Optional[CheckpointSaveError] = None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: Optional[int] = None):
        """The saved state at `step` (default: latest) laid out like `abstract_state` (shapes + shardings).

        A checkpoint written before each method had its own state (one state class with every method's
        fields, the unused ones empty) restores too: its empty fields are left out.
        """
        step = self.latest_step() if step is None else step
        try:
            legacy = _empty_extra_fields(self.manager.item_metadata(step), abstract_state)
            if legacy:
                return _restore_leaving_out(os.path.join(self.directory, str(step), _ITEM), abstract_state)
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise bare Exceptions for damaged files
            raise unreadable(self.directory, step, e, other_config=True) from e

    def check_fits(self, abstract_state, *, saved_run: str = "") -> None:
        """Raises CheckpointError naming the arrays whose shape or presence differ, if the latest checkpoint
        cannot restore into `abstract_state`; reads metadata only. `saved_run` describes the run that wrote it."""
        step = self.latest_step()
        if step is None:
            return
        try:
            saved = self.manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001 - e.g. an empty or cut-short _METADATA file
            raise unreadable(self.directory, step, e) from e
        saved = getattr(saved, "tree", saved)
        if not isinstance(saved, dict):
            return
        target = flax.serialization.to_state_dict(abstract_state)
        for name in _empty_extra_fields(saved, abstract_state):
            saved = {k: v for k, v in saved.items() if k != name}
        want = _shapes(target)
        have = _shapes(saved)
        problems = [f"{path}: saved {have[path]}, this config {want[path]}" for path in sorted(set(want) & set(have))
                    if have[path] != want[path]]
        problems += [f"{path}: not in the checkpoint" for path in sorted(set(want) - set(have))]
        problems += [f"{path}: only in the checkpoint" for path in sorted(set(have) - set(want))]
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise CheckpointError(
                f"{self.directory} (step {step}{', ' + saved_run if saved_run else ''}) does not fit this config's "
                f"model and optimiser: {shown}. Resume with the config that wrote it, or start afresh in another "
                "--workdir.")

    def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        self.check()
        try:
            self.manager.wait_until_finished()  # the previous save, whose failure is its own
        except Exception as e:  # noqa: BLE001
            self._fail(e, self._saving)
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as e:  # noqa: BLE001 - the previous asynchronous save's error, or this one's
            self._fail(e, step)
        self._saving = step
        logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return True

    def check(self) -> None:
        """Raises CheckpointSaveError if an asynchronous save has failed (asked at every step boundary, so that a
        run stops at the first boundary after the failure is known; the steps trained while the write was in
        flight are not saved, and the next save waits for the write, so they never pass the next checkpoint)."""
        if self._failed is not None:
            raise self._failed
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._fail(e, self._saving)

    def _fail(self, error: Exception, step: Optional[int]):
        cause = first_line(error)
        good = _finished_steps(self.directory)
        last = (f"The last good checkpoint is step {good[-1]} in {self.directory} (re-running resumes from it)"
                if good else "No checkpoint was saved before it")
        self._failed = CheckpointSaveError(
            f"Could not write the checkpoint of step {step} to {self.directory}: {cause}. The run stopped there. "
            f"{last}. Free space on that disk or make the directory writable, then re-run the same command; or "
            "copy the workdir to another disk and re-run with --workdir pointing there.")
        raise self._failed from error

    def close(self):
        """Waits for asynchronous saves to land (nothing is lost at exit); a failed one raises CheckpointSaveError,
        unless the run already stopped for one."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if self._failed is None:
                self._fail(e, self._saving)
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - the failure is reported already
                logging.warning("closing the checkpoint manager of %s: %s", self.directory, e)


def check_writable(workdir: str) -> None:
    """Raises CheckpointSaveError if `workdir/checkpoints` cannot be written (a read-only directory or disk, a
    full disk, a path without write permission), by writing and removing a small file there: called before
    any compute, so that such a run stops before it trains rather than at its first checkpoint. Process 0
    only, which writes the checkpoints' shared files."""
    if jax.process_index() != 0:
        return
    import tensorflow as tf

    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    probe = os.path.join(directory, f".write-check-{os.getpid()}")
    blocking = _file_in_the_way(workdir)
    if blocking is not None:
        from vitdistill.errors import ConfigError

        where = (f"--workdir={workdir} is a file, not a directory" if blocking == workdir else
                 f"{blocking} is a file, not a directory, and this run's folder {workdir} would be inside it")
        raise ConfigError(f"{where}: give --workdir a directory (a new path, "
                          "or an earlier run's workdir to resume it)")
    try:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("vitdistill checks that checkpoints can be written here\n")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        good = _finished_steps(directory)
        kept = (f"Its last good checkpoint, step {good[-1]}, is untouched (re-running resumes from it once the "
                "directory is writable)" if good else "No checkpoint is there yet")
        raise CheckpointSaveError(
            f"Cannot write checkpoints to {directory}: {first_line(e)}. Nothing was trained. {kept}. Make the "
            "directory writable (or free space on its disk), or copy the workdir to another disk and pass "
            "--workdir pointing there.") from e


def _file_in_the_way(workdir: str):
    """`workdir`, or the nearest of its parents that exists, where that is a file (a local path; None else)."""
    import tensorflow as tf

    path = workdir
    while not paths.is_remote(path) and not tf.io.gfile.exists(path):
        parent = os.path.dirname(path.rstrip("/"))
        if not parent or parent == path:
            return None
        path = parent
    return path if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path) else None


def unreadable(directory: str, step: int, error: Exception, *, other_config: bool = False) -> CheckpointError:
    """The error for a checkpoint that cannot be read: it names the step, the cause, and the way back (the step
    before it, where there is one); with `other_config`, also the other reading (another config wrote it)."""
    earlier = [s for s in _finished_steps(directory) if s < step]
    error = root_cause(error)
    back = (f"delete {os.path.join(directory, str(step))} to resume from step {earlier[-1]}" if earlier else
            f"delete {os.path.join(directory, str(step))} to start afresh (no earlier checkpoint is there)")
    other = (" If another config wrote it, resume with that config, or start afresh in another --workdir."
             if other_config else "")
    return CheckpointError(
        f"Cannot read the checkpoint of step {step} in {directory} ({first_line(error)}). If it is damaged or "
        f"incomplete (a run killed while writing it, a copy cut short, a full disk), {back}, or copy it again "
        f"from a whole copy.{other}")


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: tensorstore's read error ("OUT_OF_RANGE: Error reading ... Requested
    byte range ...") rather than orbax's wrapper around it, whose message is a page of TensorStore spec."""
    seen = set()
    while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished training checkpoint (a run there resumes instead of starting)."""
    return bool(_finished_steps(os.path.join(workdir, CHECKPOINTS_DIR)))


def _finished_steps(directory: str) -> list:
    """The steps whose checkpoint was finished (orbax renames a step's directory to its number at the end)."""
    import tensorflow as tf

    try:
        return sorted(int(name.rstrip("/")) for name in tf.io.gfile.listdir(directory) if name.rstrip("/").isdigit())
    except Exception:  # noqa: BLE001 - a vanished directory holds none
        return []


def quiet_orbax_errors() -> None:
    """Orbax logs each failed background write or read with its traceback (hundreds of lines for a full disk);
    the failure reaches the run as one CheckpointSaveError or CheckpointError instead, so those records are
    dropped."""
    import logging as std_logging

    absl_logger = std_logging.getLogger("absl")
    if not any(getattr(f, "vitdistill", False) for f in absl_logger.filters):
        def drop_orbax(record):
            return not (record.levelno >= std_logging.ERROR and "orbax" in record.pathname)
        drop_orbax.vitdistill = True
        absl_logger.addFilter(drop_orbax)
        std_logging.getLogger("asyncio").addFilter(lambda record: "orbax" not in record.getMessage())
        import sys
        import threading

        def closed_loop(exc) -> bool:
            return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

        previous_thread_hook = threading.excepthook

        def quiet_closed_loops_in_threads(args):  # orbax's writer threads after a failed save
            if not closed_loop(args.exc_value):
                previous_thread_hook(args)
        threading.excepthook = quiet_closed_loops_in_threads
        # After the first failed write of a save, orbax closes that save's event loop while tensorstore's other
        # writes are still in flight; as each finishes, tensorstore's C++ callback calls the closed loop's
        # call_soon_threadsafe and reports the RuntimeError as "unraisable" (136 tracebacks on a 1 MiB disk).
        # The failure itself has already reached the run as a CheckpointSaveError.
        previous_unraisable_hook = sys.unraisablehook

        def quiet_closed_loops_unraisable(unraisable):
            if not closed_loop(unraisable.exc_value):
                previous_unraisable_hook(unraisable)
        sys.unraisablehook = quiet_closed_loops_unraisable


def _shapes(tree) -> dict:
    """{'a/b/c': shape} of every array leaf of a nested dict (metadata or abstract arrays)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = tuple(shape)
    return out


def _empty_extra_fields(saved_metadata, abstract_state) -> list:
    """Top-level fields the checkpoint has and the state has not, if every one of them is empty, else []."""
    saved = getattr(saved_metadata, "tree", saved_metadata)
    if not isinstance(saved, dict):
        return []
    extra = sorted(set(saved) - set(flax.serialization.to_state_dict(abstract_state)))
    return extra if extra and all(saved[name] == {} for name in extra) else []


def _restore_leaving_out(path: str, abstract_state):
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args,
                                                                      partial_restore=True))


def latest_raw_state(workdir: str) -> tuple[int, dict[str, Any]]:
    """(step, the latest saved state as nested dicts of numpy arrays) of a training workdir, whatever mesh or
    number of processes wrote it (no target: nothing is placed on devices).

    Raises CheckpointError if the workdir has no finished checkpoint.
    """
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    quiet_orbax_errors()  # a damaged file: orbax's reader threads report their closed event loops
    with ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler()) as manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{directory} holds no finished checkpoint; finish (or re-run) that training run "
                                  "first")
        try:
            saved = manager.item_metadata(step)
            return step, manager.restore(step, args=as_numpy(getattr(saved, "tree", saved)))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise bare Exceptions for damaged files
            raise unreadable(directory, step, e) from e


def as_numpy(tree) -> ocp.args.PyTreeRestore:
    """Restore arguments that bring back every array of a saved tree (its metadata) as numpy, not placed with
    the saved shardings: the topology that wrote it does not matter."""
    return ocp.args.PyTreeRestore(restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                            tree))
