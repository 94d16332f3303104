"""Train the noise-aware classifier that guides a run: ``python -m experiments.noisy_classifier --workdir RUN``.

Reads the diffusion run's config from RUN (its schedule and image size fix what
x_t the classifier sees), trains p(y | x_t, t) on MNIST's labelled training
split (the run's ``data.max_train_examples`` first images, as the run saw) into
``RUN/noisy_classifier`` (or ``--out``), resuming there if a run was cut short,
and prints its test accuracy per quarter of the timestep range (also written
to ``accuracy.json`` there). See :mod:`ddpm_jax.training.noisy_classifier`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import flags
from ddpm_jax.training import noisy_classifier as nc
from ddpm_jax.training import noisy_classifier_training as nct
from ddpm_jax.training.checkpoint import load_checkpoint
from ddpm_jax.training.loop import TrainingInterrupted


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.noisy_classifier", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the diffusion run's directory (its config is read)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--idx-dir", default=None, help="read MNIST from the standard IDX files in this folder")
    source.add_argument("--data-dir", default=None, help="TFDS data directory (as for training)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default: {nc.noisy_classifier_config().train.num_steps})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step (default: {nc.noisy_classifier_config().train.batch_size})")
    p.add_argument("--out", default=None, help=f"output folder (default: WORKDIR/{nc.DEFAULT_SUBDIR})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    config = nc.noisy_classifier_config()
    if args.steps is not None:
        config.train.num_steps = args.steps
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    out = args.out or os.path.join(args.workdir, nc.DEFAULT_SUBDIR)
    try:
        # Checked again with the data, but here too, before the data is loaded (or downloaded).
        for field, value in (("train.num_steps", args.steps), ("train.batch_size", args.batch_size)):
            if value is not None and not 1 <= value <= 2**31 - 1:
                raise ValueError(f"{field}={value} is not allowed: an integer in 1..{2**31 - 1}.")
        run_config = load_checkpoint(args.workdir).config
        train_images, train_labels = flags.load_run_split(run_config, "train", args)
        test_images, test_labels = flags.load_run_split(run_config, "test", args)
    except (ValueError, FileNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run_config.data.max_train_examples:
        train_images = train_images[: run_config.data.max_train_examples]
        train_labels = train_labels[: run_config.data.max_train_examples]
    print(f"noisy classifier for {args.workdir} ({config.train.num_steps:,} steps at batch "
          f"{config.train.batch_size}) -> {out}", flush=True)
    start = time.perf_counter()
    try:
        classifier = nct.train_noisy_classifier(
            run_config, train_images, train_labels, out, config=config, test_images=test_images,
            test_labels=test_labels, progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum  # the shell's convention for "ended by signal N"
    seconds = time.perf_counter() - start
    result = nc.read_accuracy(out)
    print(f"step {classifier.step:,}; test accuracy on {result['num_examples']:,} noised test images: "
          f"{result['accuracy']:.2%} overall ({seconds:.0f} s including the evaluation)")
    for (lo, hi), acc, count in zip(result["quarters"], result["accuracy_by_quarter"], result["count_by_quarter"]):
        shown = f"{acc:.2%}" if acc is not None else "-"
        print(f"  t in [{lo:>4}, {hi:>4}): {shown:>7}  ({count:,} images)")
    print(f"wrote {os.path.join(out, 'accuracy.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
