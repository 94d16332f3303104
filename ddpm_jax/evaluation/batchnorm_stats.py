"""BatchNorm statistics recomputed for the weights that sample ("precise BN").

A BatchNorm network (the report's U-Net) trains with each batch's statistics
and keeps running averages of them for evaluation. Those averages are a poor
fit for sampling in two ways: they average only the last ~10 batches
(momentum 0.9, PyTorch's 0.1), each from weights a step older, and they were
collected with the raw weights while sampling uses their EMA. Recomputing
them with the weights that will sample, averaged over many batches of noised
training images at mixed timesteps (the batches training normalized with),
is Wu & Johnson's "precise BatchNorm" (2021, "Rethinking 'Batch' in
BatchNorm", sec. 3). ``python -m experiments.batchnorm_check`` measures what
it buys; ``ddpm-jax-evaluate --batchnorm recalibrated`` samples
with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.configs import build_model
from ddpm_jax.data import preprocess
from ddpm_jax.diffusion.process import q_sample
from ddpm_jax.training.checkpoint import DiffusionCheckpoint


def recalibrate_batch_stats(
    checkpoint: DiffusionCheckpoint,
    images_u8: np.ndarray,
    key: jax.Array,
    *,
    num_batches: int = 100,
    batch_size: int | None = None,
    labels: np.ndarray | None = None,
) -> DiffusionCheckpoint:
    """``checkpoint`` with its BatchNorm statistics recomputed for the weights it samples with.

    Each of ``num_batches`` batches (``batch_size``, default the training batch) draws
    training images, timesteps ``t ~ Uniform{0..T-1}`` and noise as training does, and
    runs the network in training mode on ``x_t``; every BatchNorm layer's mean and
    variance are the averages of its per-batch statistics. A class-conditional network
    sees the images' ``labels`` (int ``(N,)``), dropped to the null label at the
    training rate, as in training. ``images_u8``: uint8 ``(N, 28, 28, 1)``. A network
    without BatchNorm is returned as it is.
    """
    if not checkpoint.batch_stats:
        return checkpoint
    config = checkpoint.config
    model = build_model(config.model)
    batch_size = int(batch_size or config.train.batch_size)
    if not 1 <= batch_size <= len(images_u8):
        raise ValueError(f"batch_size={batch_size} must lie in 1..{len(images_u8)} (the images given).")
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be at least 1.")
    num_classes = int(config.model.get("num_classes", 0))
    if num_classes and labels is None:
        raise ValueError("a class-conditional network needs the images' labels to recalibrate with.")
    schedule = checkpoint.schedule
    params = checkpoint.variables["params"]
    zeros = jax.tree.map(jnp.zeros_like, checkpoint.batch_stats)
    ones = jax.tree.map(jnp.ones_like, checkpoint.batch_stats)
    all_images = jnp.asarray(images_u8)
    all_labels = None if labels is None else jnp.asarray(labels, jnp.int32)

    @jax.jit
    def running_update(key, start):
        """The running averages after one training-mode step from ``start`` on a fresh noised batch."""
        idx_key, t_key, noise_key, drop_key = jax.random.split(key, 4)
        idx = jax.random.choice(idx_key, all_images.shape[0], (batch_size,), replace=False)
        x0 = preprocess(all_images[idx], config.data.image_size)
        t = jax.random.randint(t_key, (batch_size,), 0, schedule.num_timesteps)
        x_t = q_sample(schedule, x0, t, jax.random.normal(noise_key, x0.shape))
        y = None
        if num_classes:
            dropped = jax.random.uniform(drop_key, (batch_size,)) < float(config.train.get("p_uncond", 0.1))
            y = jnp.where(dropped, num_classes, all_labels[idx])
        _, updates = model.apply({"params": params, "batch_stats": start}, x_t, t, y=y, train=True,
                                 mutable=["batch_stats"])
        return updates["batch_stats"]

    # A running average r becomes m r + (1 - m) s for the batch's statistic s: from r = 0 it holds
    # (1 - m) s, from r = 1 it holds m + (1 - m) s. Their difference, on any one batch, is each layer's
    # momentum m, found once; every batch then needs one pass from r = 0.
    probe = jax.random.fold_in(key, num_batches)
    keep = jax.tree.map(lambda u1, u0: 1.0 - (u1 - u0), running_update(probe, ones), running_update(probe, zeros))
    total = zeros
    for b in range(num_batches):
        statistics = jax.tree.map(jnp.divide, running_update(jax.random.fold_in(key, b), zeros), keep)
        total = jax.tree.map(jnp.add, total, statistics)
    return checkpoint.replace(batch_stats=jax.tree.map(lambda s: s / num_batches, total))
