"""``python -m experiments.evaluate``: measure a trained run from the repository root, the same program as
``ddpm-jax-evaluate``.

FID, unreadable rate and digit histogram of a run's samples; ``--help`` lists the flags. The
program lives in :mod:`ddpm_jax.cli.evaluate`.
"""

import sys

from ddpm_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.evaluate"))
