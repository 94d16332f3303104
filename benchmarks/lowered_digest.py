"""A digest of the train step as lowered for each CPU preset: ``python benchmarks/lowered_digest.py``.

The step is ``ddpm_jax.train_step`` on a batch of the preset's size, lowered by ``jax.jit`` to StableHLO with
the source locations stripped, so two trees whose digests agree hand XLA the same program: the same
speed by construction, whatever a timing on a drifting machine says. Only public names are used
(``get_config``, ``create_train_state``, ``configs.schedule_from_config``, ``train_step``), so the script runs
against any revision of the package: ``benchmarks.revisions`` runs it with the other tree on ``PYTHONPATH``.
Prints one JSON line: ``package``, the folder the package was imported from, and ``digests``, preset -> the
first 16 hex digits of the SHA-256 of the program text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import ddpm_jax

# The suite's CPU presets and train batches (benchmarks/__main__.py's PRESETS); the network alone, as there.
PRESETS = {"seed": 128, "cpu": 64}


def lowered_train_step(preset: str, batch: int) -> str:
    """The StableHLO text of one train step of ``preset`` at ``batch``, without source locations."""
    config = ddpm_jax.get_config(preset)
    config.model.num_classes = 0
    state = ddpm_jax.create_train_state(config)
    schedule = ddpm_jax.configs.schedule_from_config(config)
    size = int(config.data.image_size)
    images = jnp.zeros((batch, size, size, int(config.data.channels)), jnp.float32)
    text = jax.jit(ddpm_jax.train_step).lower(state, images, schedule).as_text()
    return re.sub(r"loc\([^\n]*?\)", "", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/lowered_digest.py", description=__doc__.splitlines()[0])
    p.add_argument("--expect", default=None, help="refuse (exit 2) unless ddpm_jax was imported from DIR/ddpm_jax")
    args = p.parse_args(argv)
    package = Path(ddpm_jax.__file__).resolve().parent
    if args.expect is not None and package != (Path(args.expect) / "ddpm_jax").resolve():
        print(f"error: ddpm_jax came from {package}, not from {args.expect}", file=sys.stderr)
        return 2
    ddpm_jax.cpu.configure()
    digests = {preset: hashlib.sha256(lowered_train_step(preset, batch).encode()).hexdigest()[:16]
               for preset, batch in PRESETS.items()}
    print(json.dumps({"package": str(package), "digests": digests}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
