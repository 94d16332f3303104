"""Training objectives."""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import q_sample
from ddpm_jax.schedules import DiffusionSchedule

# eps_fn(x_t, t) -> (eps_hat, aux): the network's noise prediction, plus whatever
# the caller wants back (BatchNorm's updated statistics, say).
EpsFn = Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, object]]


def l_simple(
    schedule: DiffusionSchedule, eps_fn: EpsFn, x0: jnp.ndarray, key: jax.Array
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, object]:
    """L_simple (Ho et al. 2020, eq. 14; the report's eq. 16) for one batch.

    Draws ``t ~ Uniform{0..T-1}`` and ``eps ~ N(0, I)`` per image and scores
    ``||eps - eps_hat(x_t, t)||^2``, averaged over pixels.

    Args:
      schedule: the diffusion tables.
      eps_fn: ``(x_t, t) -> (eps_hat, aux)``, ``eps_hat`` of ``x_t``'s shape.
      x0: clean images ``(B, H, W, C)`` in [-1, 1].
      key: PRNG key for t and the noise.

    Returns:
      ``(loss, per_image_loss (B,), t (B,), aux)``: the batch mean, each image's
      loss and timestep (for per-timestep logging), and ``eps_fn``'s aux.
    """
    chex.assert_rank(x0, 4)
    t_key, noise_key = jax.random.split(key)
    batch = x0.shape[0]
    t = jax.random.randint(t_key, (batch,), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    eps_hat, aux = eps_fn(x_t, t)
    chex.assert_equal_shape([eps_hat, noise])
    per_image = jnp.mean(jnp.square(noise - eps_hat.astype(jnp.float32)), axis=(1, 2, 3))
    return jnp.mean(per_image), per_image, t, aux
