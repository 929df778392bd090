"""Orbax checkpoints of the whole train state in `workdir/checkpoints`; resuming is automatic."""
from __future__ import annotations

import os
from typing import Optional

import orbax.checkpoint as ocp
from absl import logging

from vitdistill.errors import CheckpointError


class Checkpointer:
    """Saves every `every_steps` and at the end, keeps the last `keep`, restores the latest."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(workdir, "checkpoints")
        self.every_steps = max(1, int(every_steps))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: Optional[int] = None):
        """The saved state at `step` (default: latest) laid out like `abstract_state` (shapes + shardings)."""
        step = self.latest_step() if step is None else step
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"The checkpoint at step {step} in {self.directory} does not fit this config's model and optimiser "
                f"({e}). Either use the config that wrote it, or start afresh in another --workdir.") from e

    def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return True

    def close(self):
        """Waits for asynchronous saves to land (nothing is lost at exit)."""
        self.manager.wait_until_finished()
        self.manager.close()
