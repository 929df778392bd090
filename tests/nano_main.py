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

if __name__ == "__main__":
    models.MODELS.update(legacy_workdirs.NANO_MODELS)
    app.run(main.main, flags_parser=main._parse_flags)
