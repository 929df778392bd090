"""Import TensorFlow without the start-up lines that TF_CPP_MIN_LOG_LEVEL no longer silences.

TensorFlow 2.21 logs through absl's C++ logging before anything has initialised it, and such messages go
to stderr whatever TF_CPP_MIN_LOG_LEVEL says (tensorflow/tensorflow#102212): every run of ours began with
four lines, twice absl's "All log messages before absl::InitializeLog() is called are written to STDERR"
and an INFO line about oneDNN, before the run's own output or its one-line error. `tensorflow()` imports
TensorFlow with file descriptor 2 pointed at a temporary file, then writes back every line the level keeps
(absl's severity prefix I/W/E/F against TF_CPP_MIN_LOG_LEVEL's 0-3; lines without a prefix, a Python
warning say, are kept). With TF_CPP_MIN_LOG_LEVEL unset or 0 nothing is captured. A crash inside the
import itself (an illegal instruction on a CPU TensorFlow was not built for) would lose its lines: run
with TF_CPP_MIN_LOG_LEVEL=0 to see them.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile

ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_PREFIX = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d")  # absl's: severity, MMDD, time


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it: 0 where unset or not a number."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def kept_lines(text: str, level: int) -> str:
    """The lines of `text` (what an import wrote to stderr) that log level `level` shows: absl's preamble and
    messages below `level` go, with their continuation lines (those without a prefix after a dropped one)."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == ABSL_PREAMBLE:
            dropping = False
            continue
        prefix = _PREFIX.match(line)
        if prefix:
            dropping = _SEVERITY[prefix.group(1)] < level
        if not dropping:
            kept.append(line)
    return "".join(kept)


def quiet_import(name: str):
    """`importlib.import_module(name)`, stderr filtered by `kept_lines` at `min_log_level()` (when it is > 0)."""
    if name in sys.modules:
        return sys.modules[name]
    level = min_log_level()
    if level <= 0:
        return importlib.import_module(name)
    try:
        captured = tempfile.TemporaryFile()
    except OSError:  # no writable temporary directory: the lines are only noise
        return importlib.import_module(name)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with captured:
            os.dup2(captured.fileno(), 2)
            try:
                return importlib.import_module(name)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                shown = kept_lines(captured.read().decode("utf-8", "replace"), level)
                if shown:
                    sys.stderr.write(shown)
                    sys.stderr.flush()
    finally:
        os.close(saved)


def tensorflow():
    """The `tensorflow` module, imported by `quiet_import`."""
    return quiet_import("tensorflow")
