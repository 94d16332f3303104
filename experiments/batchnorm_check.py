"""Does BatchNorm's running statistics hurt a trained run? ``python -m experiments.batchnorm_check --workdir RUN``.

A BatchNorm network (the report's U-Net) trains on batches whose images sit at
random, mixed timesteps and normalizes with those batches' statistics; it samples
with the running averages of them, on batches whose images all sit at one
timestep. This measures the network's denoising error (L_simple, eps-MSE) on
noised **test** images, per quarter of the timestep range, three ways:

- ``running``: the running averages (how sampling normalizes by default);
- ``mixed_batch``: each batch's own statistics, the batch at mixed timesteps
  (exactly how training normalized);
- ``per_t_batch``: each batch's own statistics, the batch at one timestep
  (how ``sample(..., batchnorm='batch')`` normalizes);
- ``recalibrated``: statistics recomputed for these weights over 100 batches of
  noised training images (:func:`ddpm_jax.evaluation.batchnorm_stats.recalibrate_batch_stats`,
  what ``experiments.evaluate --batchnorm recalibrated`` samples with).

If ``running`` matches ``mixed_batch``, the running averages reproduce what the
network was trained with. Writes ``RUN/batchnorm_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import flags
from ddpm_jax.configs import build_model
from ddpm_jax.diffusion.process import q_sample
from ddpm_jax.evaluation.batchnorm_stats import recalibrate_batch_stats
from ddpm_jax.training.checkpoint import load_checkpoint

QUARTERS = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.batchnorm_check", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's directory (its latest checkpoint)")
    flags.add_data_flags(p)
    p.add_argument("--num-images", type=int, default=2000, help="test images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=100, help="images per batch (default: %(default)s)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def denoising_errors(checkpoint, images_u8: np.ndarray, batch_size: int, key: jax.Array,
                     recalibrated=None) -> dict:
    """Mean eps-MSE per timestep quarter (smallest t first) under each normalization, ``(4,)`` each.

    ``recalibrated``: the same checkpoint with recomputed statistics, for a fourth row.
    """
    config = checkpoint.config
    model, schedule = build_model(config.model), checkpoint.schedule
    num_timesteps = schedule.num_timesteps
    x0_all = data_lib.preprocess(images_u8, config.data.image_size)
    labels = None
    if int(config.model.get("num_classes", 0)):
        labels = jnp.full((batch_size,), int(config.model.num_classes), jnp.int32)  # the null label
    variables = checkpoint.variables
    recalibrated_variables = (recalibrated or checkpoint).variables

    @jax.jit
    def errors(x0, t, noise):
        x_t = q_sample(schedule, x0, t, noise)
        out = {}
        running = model.apply(variables, x_t, t, y=labels, train=False)
        batch = model.apply(variables, x_t, t, y=labels, train=True, mutable=["batch_stats"])[0]
        recomputed = model.apply(recalibrated_variables, x_t, t, y=labels, train=False)
        for name, eps in (("running", running), ("batch", batch), ("recalibrated", recomputed)):
            out[name] = jnp.mean(jnp.square(eps[..., :1] - noise), axis=(1, 2, 3))
        return out

    names = ("running", "mixed_batch", "per_t_batch") + (("recalibrated",) if recalibrated is not None else ())
    sums = {k: np.zeros(QUARTERS) for k in names}
    counts = {k: np.zeros(QUARTERS) for k in sums}
    num_batches = len(x0_all) // batch_size
    for b in range(num_batches):
        x0 = x0_all[b * batch_size:(b + 1) * batch_size]
        k_t, k_noise = jax.random.split(jax.random.fold_in(key, b))
        noise = jax.random.normal(k_noise, x0.shape)
        mixed_t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps)
        one_t = jnp.full((batch_size,), b * num_timesteps // num_batches)  # evenly over 0..T-1
        mixed = errors(x0, mixed_t, noise)
        single = errors(x0, one_t, noise)
        rows = [("running", mixed["running"], mixed_t), ("mixed_batch", mixed["batch"], mixed_t),
                ("per_t_batch", single["batch"], one_t), ("recalibrated", mixed["recalibrated"], mixed_t)]
        for name, per_image, t in rows[:len(names)]:
            q = np.asarray(t) * QUARTERS // num_timesteps
            np.add.at(sums[name], q, np.asarray(per_image))
            np.add.at(counts[name], q, 1)
    return {k: (sums[k] / np.maximum(counts[k], 1)).tolist() for k in sums} | {
        "overall": {k: float(sums[k].sum() / max(counts[k].sum(), 1)) for k in sums}}


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.workdir, weights=args.weights)
        images, _ = flags.load_run_split(checkpoint.config, "test", args)
        train_images, train_labels = flags.load_run_split(checkpoint.config, "train", args)
    except (ValueError, FileNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not checkpoint.batch_stats:
        print("error: this network has no BatchNorm statistics (nothing to check).", file=sys.stderr)
        return 2
    if not 1 <= args.batch_size <= args.num_images:
        print(f"error: --batch-size {args.batch_size}: must lie in 1..--num-images ({args.num_images}).",
              file=sys.stderr)
        return 2
    conditional = bool(int(checkpoint.config.model.get("num_classes", 0)))
    recalibrated = recalibrate_batch_stats(checkpoint, train_images, jax.random.PRNGKey(args.seed + 1),
                                           batch_size=min(checkpoint.config.train.batch_size, len(train_images)),
                                           labels=train_labels if conditional else None)
    result = denoising_errors(checkpoint, images[: args.num_images], args.batch_size, jax.random.PRNGKey(args.seed),
                              recalibrated)
    report = {"step": checkpoint.step, "weights": checkpoint.weights_used, "num_images": args.num_images,
              "batch_size": args.batch_size, "eps_mse_by_quarter_smallest_t_first": result}
    Path(args.workdir, "batchnorm_check.json").write_text(json.dumps(report, indent=2))
    print(f"eps-MSE on {args.num_images:,} noised test images (step {checkpoint.step:,}, {checkpoint.weights_used} "
          "weights), per quarter of t (smallest first), and overall:")
    for name in ("running", "mixed_batch", "per_t_batch", "recalibrated"):
        print(f"{name:>12}: " + " ".join(f"{v:.4f}" for v in result[name]) + f"   {result['overall'][name]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
