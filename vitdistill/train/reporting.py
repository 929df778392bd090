"""What a run tells its user: a progress bar, TensorBoard events and `metrics.jsonl` in the workdir."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import jax
import numpy as np

from vitdistill.errors import CheckpointSaveError, first_line

CONFIG_FILE = "config.json"  # the resolved config, inside a workdir


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class Reporter:
    """Writes metrics from process 0 only; every process keeps the same progress counters."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, global_batch: int,
                 progress_bar: bool = True, name: str = "train"):
        self.is_writer = jax.process_index() == 0
        self.total_steps = total_steps
        self.global_batch = global_batch
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._bar = None
        self._tb = None
        self._jsonl = None
        self._workdir = workdir
        self._failed: Optional[CheckpointSaveError] = None
        if self.is_writer:
            import tensorflow as tf

            tf.io.gfile.makedirs(workdir)
            self._jsonl = tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl"), "a")

            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
            self._start = (time.perf_counter(), start_step)
            self._name = name
            if progress_bar and sys.stdout.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
                                 file=sys.stdout, mininterval=1.0, smoothing=0.1)

    def throughput(self, step: int) -> dict:
        """Images/s since the previous call (so the first window includes compilation)."""
        now = time.perf_counter()
        steps, seconds = step - self._last_step, now - self._last_time
        self._last_time, self._last_step = now, step
        if steps <= 0 or seconds <= 0:
            return {}
        return {"images_per_sec": steps * self.global_batch / seconds, "step_ms": 1000.0 * seconds / steps}

    def advance(self, step: int, postfix: Optional[dict] = None):
        """Moves the bar (on a terminal); elsewhere prints one line per logged step, with the ETA."""
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in (postfix or {}).items()}
        if self._bar is not None:
            self._bar.n = step
            if postfix:
                self._bar.set_postfix(text, refresh=False)
            self._bar.refresh()
        elif postfix and self.is_writer:
            began, first = self._start
            rate = (step - first) / max(time.perf_counter() - began, 1e-9)
            eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
            fields = " ".join(f"{k}={v}" for k, v in text.items())
            print(f"{self._name} step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) {fields} "
                  f"eta={_duration(eta)}", flush=True)

    def write(self, step: int, metrics: dict, split: str = "train"):
        if not self.is_writer:
            return
        import tensorflow as tf

        values = {k: _scalar(v) for k, v in metrics.items()}
        try:
            self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}, allow_nan=True) + "\n")
            self._jsonl.flush()
            with self._tb.as_default(step=int(step)):
                for k, v in values.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        tf.summary.scalar(f"{split}/{k}", v)
            self._tb.flush()
        except (OSError, tf.errors.OpError) as e:  # a full disk, a read-only or vanished workdir
            self._fail(step, e)

    def _fail(self, step: int, error: Exception):
        message = first_line(error)
        self._failed = CheckpointSaveError(
            f"Could not write the metrics of step {step} to {self._workdir} (metrics.jsonl, tensorboard/): "
            f"{message}. The run stopped there; the checkpoints already written stay in "
            f"{os.path.join(self._workdir, 'checkpoints')} and re-running the same command resumes from the last "
            "one. Free space on that disk or make the workdir writable, or copy the workdir elsewhere and re-run "
            "with --workdir pointing there.")
        raise self._failed from error

    def message(self, text: str):
        """A line that does not break the progress bar."""
        if not self.is_writer:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        """Closes the bar and the writers; a write that fails here (a full disk) is one CheckpointSaveError,
        and none once a write has already failed (that error is the run's)."""
        import tensorflow as tf

        if self._bar is not None:
            self._bar.close()
        for writer in (self._jsonl, self._tb):
            if writer is None:
                continue
            try:
                writer.close()
            except (OSError, tf.errors.OpError) as e:
                if self._failed is None:
                    self._fail(self._last_step, e)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def save_config(config, workdir: str):
    """The resolved config, as JSON, next to the checkpoints (process 0 only)."""
    if jax.process_index() != 0:
        return
    import tensorflow as tf

    path = os.path.join(workdir, CONFIG_FILE)
    partial = f"{path}.tmp-{os.getpid()}"  # then renamed: a run killed while writing leaves the old file whole
    try:
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(partial, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        tf.io.gfile.rename(partial, path, overwrite=True)
    except (OSError, tf.errors.OpError) as e:  # a read-only or full workdir, before anything was trained
        try:
            tf.io.gfile.remove(partial)
        except (OSError, tf.errors.OpError):
            pass  # never written
        raise CheckpointSaveError(f"Cannot write {path}: {first_line(e)}. Nothing was trained. "
                                  "Make the workdir writable (or free space on its disk), or pass another "
                                  "--workdir.") from e


def eval_rows(workdir: str) -> list:
    """The evaluation rows of the workdir's `metrics.jsonl` (`split == 'eval'`), in the order written."""
    from tensorflow.io import gfile

    path = os.path.join(workdir, "metrics.jsonl")
    if not gfile.exists(path):
        return []
    with gfile.GFile(path) as f:
        return [row for row in map(json.loads, f) if row.get("split") == "eval"]


def markdown_table(rows, title: str = "") -> str:
    """A Markdown table of `rows` (the first is the header), columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [title] if title else []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
