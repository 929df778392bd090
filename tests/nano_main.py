"""`python -m vitdistill.main` with the tests' nano models registered (tests/legacy_workdirs.py), so that tests
which start whole processes (two with jax.distributed, SIGTERM, resumes) compile in seconds:

    python tests/nano_main.py --config=tests/nano_config.py:dino --workdir=DIR [flags of vitdistill.main]
"""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402

import legacy_workdirs  # noqa: E402
from vitdistill import main, models  # noqa: E402


def _sigterm_at_eval_check(n: int) -> None:
    """SIGTERM to this process just before the n-th check an evaluation makes between its batches (set by
    $NANO_SIGTERM_AT_EVAL_CHECK, for the multi-process tests), then a 2 s pause before that check. JAX's
    preemption notice reaches the other processes asynchronously; on a loaded machine the 26 checks of the
    nano k-NN were sometimes all made before it arrived (the processes then agreed on the step-0 boundary,
    1 of 3 full-suite runs and 1 of 3 runs beside test_signals, on 2026-12-04). The pause is what a real evaluation batch gives it."""
    from sigterm_at_check import sigterm_at_check
    from vitdistill.train import preemption

    preemption.check_during_eval = sigterm_at_check(n, preemption.check_during_eval, pause=2.0)


def _signals_in_first_step_call(spec: str) -> None:
    """$NANO_SIGNALS_IN_FIRST_STEP, e.g. `SIGTERM@0.5` or `SIGINT@0.5,SIGINT@0.8`: each signal is sent to this
    process, by a thread, that many seconds into the first call of the train step, the call that traces
    and compiles it (seconds with an empty compilation cache). A signal placed on a timeline measured from
    outside landed elsewhere whenever the load on the machine changed between the runs (in the init, or
    after the last step); this one lands in the compile. Before each, a `nano:` line on stderr says whether
    that call was still running, which the tests check. They are sent in order, at least 50 ms apart."""
    from vitdistill.train import loop

    plan = [(signal.Signals[name], float(at)) for name, at in (item.split("@") for item in spec.split(","))]
    real = loop.jit_train_step

    def jit_train_step(*args, **kwargs):
        step, state = real(*args, **kwargs), []

        def send_all(started):
            previous = None
            for signum, at in plan:  # in order, and at least 50 ms apart: two signals sent within microseconds
                # of each other (two timers, both late on a loaded host) can be one in the kernel, a lost Ctrl-C
                # no user could cause
                time.sleep(max(0.0, started + at - time.monotonic(),
                               0.0 if previous is None else previous + 0.05 - time.monotonic()))
                where = "while it was running" if state == ["running"] else "after it had returned"
                print(f"nano: {signum.name} sent {at:.2f} s into the first train step's call, {where}",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signum)
                previous = time.monotonic()

        def first_call_signalled(*a, **k):
            if state:
                return step(*a, **k)
            state.append("running")
            threading.Thread(target=send_all, args=(time.monotonic(),), daemon=True).start()
            try:
                return step(*a, **k)
            finally:
                state[0] = "returned"

        return first_call_signalled

    loop.jit_train_step = jit_train_step


if __name__ == "__main__":
    models.MODELS.update(legacy_workdirs.NANO_MODELS)
    if os.environ.get("NANO_SIGTERM_AT_EVAL_CHECK"):
        _sigterm_at_eval_check(int(os.environ["NANO_SIGTERM_AT_EVAL_CHECK"]))
    if os.environ.get("NANO_SIGNALS_IN_FIRST_STEP"):
        _signals_in_first_step_call(os.environ["NANO_SIGNALS_IN_FIRST_STEP"])
    app.run(main.main, flags_parser=main._parse_flags)
