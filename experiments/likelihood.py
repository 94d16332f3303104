"""Negative log-likelihood of the test split in bits per dimension: ``python -m experiments.likelihood --workdir RUN``.

Computes the variational bound L_vlb (Ho et al. 2020, eq. 5, with the
discretized decoder of sec. 3.3) of every test image under a trained run's
model (:func:`ddpm_jax.evaluation.negative_log_likelihood`), prints it with its
parts and writes ``RUN/likelihood.json``. T network calls per image: the 10,000
test images take T x 10,000 forward passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from ddpm_jax import data as data_lib
from ddpm_jax import evaluation
from ddpm_jax.checkpoint import load_checkpoint
from ddpm_jax.diffusion import VARIANCE_TYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.likelihood", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's directory (its latest checkpoint)")
    p.add_argument("--step", type=int, default=None, help="this checkpoint step instead of the latest")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (as for training)")
    p.add_argument("--idx-dir", default=None, help="read MNIST from the standard IDX files in this folder")
    p.add_argument("--num-images", type=int, default=None, help="the first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=250, help="images per jitted call (default: %(default)s)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--variance", choices=VARIANCE_TYPES, default=None,
                   help="the fixed reverse variance (default: the run's sampling.variance)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
            raise ValueError(f"--batch-size {args.batch_size} and --num-images {args.num_images} must be >= 1.")
        checkpoint = load_checkpoint(args.workdir, step=args.step, weights=args.weights)
        images, _ = data_lib.load_mnist("test", data_dir=args.data_dir, idx_dir=args.idx_dir)
    except (ValueError, FileNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = images[: args.num_images] if args.num_images else images
    print(f"L_vlb of {len(images):,} test images under {args.workdir} (step {checkpoint.step:,}, "
          f"{checkpoint.weights_used} weights)", flush=True)
    start = time.perf_counter()
    result = evaluation.negative_log_likelihood(
        checkpoint, images, jax.random.PRNGKey(args.seed), batch_size=args.batch_size, variance=args.variance,
        progress=not args.no_progress,
    )
    result["seconds"] = time.perf_counter() - start
    print(f"NLL <= {result['bits_per_dim']:.4f} bits/dim (+- {result['stderr'] or 0:.4f} s.e.) over "
          f"D = {result['num_dims']} dimensions; parts: prior L_T {result['prior_bits_per_dim']:.5f}, "
          f"decoder L_0 {result['decoder_bits_per_dim']:.4f}, KL terms {result['kl_terms_bits_per_dim']:.4f}")
    out = Path(args.workdir) / "likelihood.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
