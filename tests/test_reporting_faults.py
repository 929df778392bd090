"""A metrics write that fails (full disk, read-only or vanished workdir) stops the run with one message."""
import errno
import os

import pytest

from vitdistill.errors import CheckpointSaveError, UserError
from vitdistill.train.reporting import Reporter


class _FullDisk:
    """A file whose writes fail as a full disk's do (ENOSPC), after `good` successful ones."""

    def __init__(self, inner, good=0):
        self.inner, self.good = inner, good

    def write(self, text):
        if self.good <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.good -= 1
        return self.inner.write(text)

    def flush(self):
        self.inner.flush()

    def close(self):
        self.inner.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_metrics_is_one_message_and_close_stays_quiet(tmp_path):
    reporter = Reporter(str(tmp_path), total_steps=10, start_step=0, global_batch=4, progress_bar=False)
    reporter._jsonl = _FullDisk(reporter._jsonl, good=1)
    reporter.write(1, {"loss": 2.5})
    with pytest.raises(CheckpointSaveError) as raised:
        reporter.write(2, {"loss": 2.4})
    message = str(raised.value)
    assert isinstance(raised.value, UserError)
    for part in ("metrics of step 2", str(tmp_path), "No space left on device", "re-running the same command resumes",
                 "--workdir"):
        assert part in message, (part, message)
    reporter.close()  # the run's error is the write's: closing adds none
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 1' in lines[0]


def test_a_failure_first_seen_at_close_is_reported(tmp_path):
    reporter = Reporter(str(tmp_path), total_steps=10, start_step=0, global_batch=4, progress_bar=False)
    reporter._jsonl = _FullDisk(reporter._jsonl, good=5)
    reporter.write(1, {"loss": 2.5})
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        reporter.close()
