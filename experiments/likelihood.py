"""Negative log-likelihood of the test split in bits per dimension: ``python -m experiments.likelihood --workdir RUN``.

Computes the variational bound L_vlb (Ho et al. 2020, eq. 5, with the
discretized decoder of sec. 3.3) of every test image under a trained run's
model (:func:`ddpm_jax.evaluation.evaluate.negative_log_likelihood`), prints it with its
parts and writes ``RUN/likelihood.json``. T network calls per image: the 10,000
test images take T x 10,000 forward passes. The test split is the run's dataset's
(its config says which); a run on a folder of images is measured on that folder,
given again with ``--image-dir`` (all its images: they are its training data).

Exit status: 0 done; 2 a bad flag, a missing or damaged run, a run that cannot
do what is asked (``--variance learned`` on a fixed-variance network), or data
that cannot be read: one ``error:`` line, before any computation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import flags
from ddpm_jax.diffusion.process import VARIANCE_TYPES
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.training.checkpoint import load_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = flags.OneLineErrors(prog="python -m experiments.likelihood", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's directory (its latest checkpoint)")
    p.add_argument("--step", type=int, default=None, help="this checkpoint step instead of the latest")
    flags.add_data_flags(p)
    p.add_argument("--image-dir", default=None, help="a run trained on a folder of images: the same folder")
    p.add_argument("--num-images", type=int, default=None, help="the first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=250, help="images per jitted call (default: %(default)s)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--variance", choices=VARIANCE_TYPES, default=None,
                   help="the fixed reverse variance (default: the run's sampling.variance)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    flags.add_progress_flag(p)
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values no run could use, naming the flag and what to give instead (ValueError)."""
    if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise ValueError(f"--batch-size {args.batch_size} and --num-images {args.num_images} must be >= 1.")
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step {args.step}: checkpoint steps are >= 0; leave it out for the latest checkpoint.")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed {args.seed}: must be a whole number in 0..2**63-1, e.g. --seed 0.")
    if not args.workdir.strip():
        raise ValueError("--workdir is empty; give a training run's directory, e.g. --workdir runs/mnist.")


def check_variance(variance: str | None, checkpoint, workdir: str) -> None:
    """``--variance learned`` needs a network that outputs its variance; say so before any computation."""
    learned = bool(checkpoint.config.model.get("learn_variance", False))
    if variance == "learned" and not learned:
        raise ValueError(
            f"--variance learned: the network in {workdir} was trained with a fixed variance "
            "(model.learn_variance is off), so it has no variance to use; give --variance beta or beta_tilde, "
            f"or leave --variance out for the run's own ({checkpoint.config.sampling.variance})."
        )


def check_writable(workdir: str) -> None:
    # likelihood.json is written after the whole computation: find out now that it could not be.
    try:
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: cannot write likelihood.json there ({e.strerror or e}); "
                         "give a run directory this user can write to.") from None


def _images(config, args: argparse.Namespace):
    """The images to measure: the run's dataset's test split, or its image folder (``--image-dir``)."""
    folder = flags.run_image_folder(config, args)
    if folder is not None:
        return folder.images
    return data_lib.load_dataset(config.get("dataset", "mnist"), "test", data_dir=args.data_dir, idx_dir=args.idx_dir)[0]


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    try:
        check_flags(args)
        checkpoint = load_checkpoint(args.workdir, step=args.step, weights=args.weights)
        check_variance(args.variance, checkpoint, args.workdir)
        check_writable(args.workdir)
        images = _images(checkpoint.config, args)
    except (ValueError, OSError) as e:  # IDXFormatError is a ValueError; DatasetNotFoundError an OSError
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
    try:
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)  # a reader never sees half a file
    except OSError as e:  # the disk filled up, or the folder went away during the computation
        print(f"error: could not write {out} ({e.strerror or e}); the result was: {json.dumps(result)}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
