"""Errors a user can act on: the entry points print their message, not a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (TF's `.message` where it has one), for a one-line report;
    the exception's type name when the message is empty."""
    text = (getattr(error, "message", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


class UserError(Exception):
    """Something about the input (config, data, checkpoint) that the user must change."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key, the value and the valid choices."""


class DataError(UserError, RuntimeError):
    """A data source is missing or malformed; the message says where it looked and how to fix it."""


class BadImageError(DataError):
    """An image could not be decoded; the message names the files of the failing batch."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message names what differs."""


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (a full disk, a read-only or vanished directory): the run stopped at
    once; the message names the directory, the cause and the last good checkpoint."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; training stopped before saving the bad state."""


class Preempted(Exception):
    """A run stopped on SIGTERM or Ctrl-C at a step boundary, after saving its state: not an error (the entry
    points exit 0); re-running the same command resumes."""

    exit_status = 0

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class EvalStopped(Preempted):
    """SIGTERM or Ctrl-C during an evaluation: it stops between two batches (a k-NN over a large split can
    outlast a scheduler's grace period) and the run stops after saving what it trained; several processes
    agree on the batch to stop at."""


class StoppedAtOnce(Preempted):
    """A second Ctrl-C: the run stopped without waiting for the step boundary, keeping what was saved (the
    entry points exit 130, a shell's status for an interrupted command)."""

    exit_status = 130
