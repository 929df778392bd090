"""`python -m vitdistill.main` with the tests' nano models registered (tests/legacy_workdirs.py), so that tests
which start whole processes (two with jax.distributed, SIGTERM, resumes) compile in seconds:

    python tests/nano_main.py --config=tests/nano_config.py:dino --workdir=DIR [flags of vitdistill.main]
"""
import os
import sys

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


if __name__ == "__main__":
    models.MODELS.update(legacy_workdirs.NANO_MODELS)
    if os.environ.get("NANO_SIGTERM_AT_EVAL_CHECK"):
        _sigterm_at_eval_check(int(os.environ["NANO_SIGTERM_AT_EVAL_CHECK"]))
    app.run(main.main, flags_parser=main._parse_flags)
