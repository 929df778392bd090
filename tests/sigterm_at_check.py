"""The one SIGTERM-at-an-evaluation-check wrapper of the tests: the in-process tests (test_signals.py) and the
whole-process ones (nano_main.py, $NANO_SIGTERM_AT_EVAL_CHECK) both use it. Imports nothing of vitdistill, so
importing it has no side effect on the process that does."""
import os
import signal
import time


def sigterm_at_check(n: int, real, *, pause: float = 0.0):
    """`real` (preemption.check_during_eval) wrapped so that just before the n-th check an evaluation makes
    between its batches this process gets SIGTERM, then waits `pause` seconds (a signal's handler runs before the
    next line; the pause is for notices that travel to other processes). The calls made so far are `.calls`."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(pause)
        real()

    check.calls = calls
    return check
