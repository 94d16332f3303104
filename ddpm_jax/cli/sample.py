"""Draw samples from a trained run: ``ddpm-jax-sample --workdir runs/mnist --num 64 --out samples.png``.

Loads the run's latest checkpoint (EMA weights unless ``--weights raw``), draws ``--num`` images
with :func:`ddpm_jax.sample` (the run's own sampler settings unless a flag says otherwise), and
writes them as a PNG grid (``--out``) and, with ``--npz PATH``, as a ``uint8`` array ``images``
of shape ``(N, H, W, C)`` with the asked-for ``labels`` (-1: none). The same seed gives the same
images. ``--label 7`` draws sevens from a class-conditional run. Exit status: 0 done; 2 a bad
flag or a run that cannot be loaded (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import jax
import numpy as np

from ddpm_jax import cpu
from ddpm_jax.cli import flags
from ddpm_jax.evaluation import plotting
from ddpm_jax.evaluation.evaluate import draw_samples
from ddpm_jax.training.checkpoint import load_checkpoint

PROG = "ddpm-jax-sample"  # the console script (pyproject.toml)


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's directory (its latest checkpoint samples)")
    p.add_argument("--step", type=int, default=None, help="sample from this checkpoint step instead of the latest")
    p.add_argument("--num", type=int, default=64, help="how many images (default: %(default)s)")
    p.add_argument("--out", default=None, help="the PNG grid (default: WORKDIR/sample_<seed>.png)")
    p.add_argument("--npz", default=None, help="also save the images (uint8, N x H x W x C) and labels here")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--label", type=int, default=None,
                   help="class-conditional runs: draw this class (default: labels at the training frequencies)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="class-conditional runs: classifier-free guidance w (default: the run's config)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA of the weights (default) or the last step's raw weights")
    p.add_argument("--batch-size", type=int, default=None, help="images per jitted sampler call (default: the run's)")
    flags.add_sampler_flags(p)
    p.add_argument("--nrow", type=int, default=None, help="images per row of the grid (default: about sqrt(num))")
    flags.add_progress_flag(p)
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.num <= 1_000_000:
        raise ValueError(f"--num {args.num}: must be in 1..1000000.")
    if args.nrow is not None and args.nrow < 1:
        raise ValueError(f"--nrow {args.nrow}: must be at least 1.")
    flags.check_sampling_flags(args)
    for path in (args.out, args.npz):
        if path is not None and not Path(path).parent.resolve().is_dir():
            raise ValueError(f"{path}: its folder {Path(path).parent} does not exist; create it or pick another path.")


def main(argv=None, prog: str = PROG) -> int:
    """Run the program with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv, prog)
    try:
        _check(args)
        checkpoint = load_checkpoint(args.workdir, step=args.step, weights=args.weights)
        num_classes = int(checkpoint.config.model.get("num_classes", 0))
        if args.label is not None and not 0 <= args.label < max(num_classes, 1):
            raise ValueError(f"--label {args.label}: " + (f"must be in 0..{num_classes - 1}." if num_classes else
                             "this run is unconditional (model.num_classes = 0); drop --label."))
        batch_size = min(args.batch_size or int(checkpoint.config.sampling.batch_size), args.num)
        labels = None if args.label is None else np.full((args.num,), args.label, np.int32)
        options = dict(steps=args.steps, method=args.method, order=args.order, spacing=args.spacing)
        if args.guidance_scale is not None:
            options["guidance_scale"] = args.guidance_scale
        images = draw_samples(checkpoint, jax.random.PRNGKey(args.seed), args.num, batch_size=batch_size,
                              labels=labels, progress=not args.no_progress,
                              **{k: v for k, v in options.items() if v is not None})
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, f"sample_{args.seed}.png")
    plotting.save_grid(images, out, nrow=args.nrow or max(1, math.isqrt(args.num - 1) + 1))
    print(f"{args.num} samples of step {checkpoint.step:,} -> {out}", flush=True)
    if args.npz:
        np.savez_compressed(args.npz, images=images,
                            labels=labels if labels is not None else np.full((args.num,), -1, np.int32))
        print(f"images {images.shape} {images.dtype} -> {args.npz}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
