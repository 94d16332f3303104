"""Samplers: pure functions of network variables and a PRNG key.

Each factory returns a function to ``jax.jit`` that runs the whole reverse
chain inside one ``lax.scan`` (no Python loop over timesteps).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import MEAN_TYPES, MeanType, VarianceType, p_mean, p_variance
from ddpm_jax.schedules import DiffusionSchedule

# eps_fn(variables, x_t, t) -> eps_hat with x_t's shape; t int (B,), 0-based.
EpsModelFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def make_ancestral_sampler(
    eps_fn: EpsModelFn,
    schedule: DiffusionSchedule,
    shape: tuple[int, int, int, int],
    *,
    variance: VarianceType = "beta",
    mean: MeanType = "x0_clip",
    return_every: int = 0,
    sharding: jax.sharding.Sharding | None = None,
) -> Callable[[Any, jax.Array], Any]:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2.

    ``x_T ~ N(0, I)``; for ``i = T-1 .. 0``: ``x_{i} = mu(x_{i+1}, i) + sigma_i z``
    with ``z ~ N(0, I)`` except at the last step (``i = 0``), which adds no noise.

    Args:
      eps_fn: the network's noise prediction, ``(variables, x_t, t) -> eps``.
      schedule: the schedule the network was trained with.
      shape: ``(B, H, W, C)`` of the batch to draw.
      variance: sigma_t^2 = beta_t (``'beta'``) or beta-tilde_t (``'beta_tilde'``).
      mean: ``'x0_clip'`` (clip the predicted x_0, then take the posterior
        mean; Ho et al.'s code) or ``'eps'`` (the report's eq. 14 literally).
      return_every: if k > 0, also return every k-th state of the chain.
      sharding: optional sharding of the batch (e.g. split over a data mesh,
        :func:`ddpm_jax.parallel.batch_sharded`); the chain stays in it, so every
        device runs the network on its share of the batch. The numbers drawn
        do not depend on it.

    Returns:
      ``sample_fn(variables, key)`` giving ``x_0`` of ``shape`` in [-1, 1]; with
      ``return_every=k`` it gives ``(x_0, frames)`` where ``frames`` has shape
      ``(F, B, H, W, C)``: ``x_T`` (pure noise) first, then the state after every
      k-th step, and the final (clipped) ``x_0`` last.
    """
    chex.assert_equal(len(shape), 4)
    sigmas = jnp.sqrt(p_variance(schedule, variance))
    if mean not in MEAN_TYPES:
        raise ValueError(f"unknown mean_type {mean!r}; allowed: {', '.join(MEAN_TYPES)}.")
    num_timesteps = schedule.num_timesteps
    if return_every < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}.")

    def constrain(x):
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    def sample_fn(variables, key: jax.Array):
        init_key, step_key = jax.random.split(key)
        x_T = constrain(jax.random.normal(init_key, shape, dtype=jnp.float32))

        def reverse_step(x, i):
            t = jnp.full((shape[0],), i, dtype=jnp.int32)
            eps = eps_fn(variables, x, t)
            chex.assert_equal_shape([eps, x])
            mu = p_mean(schedule, x, t, eps, mean)
            z = jax.random.normal(jax.random.fold_in(step_key, i), shape, dtype=jnp.float32)
            x_prev = constrain(mu + jnp.where(i > 0, sigmas[i], 0.0) * z)
            return x_prev, (x_prev if return_every else None)

        x0, chain = jax.lax.scan(reverse_step, x_T, jnp.arange(num_timesteps - 1, -1, -1))
        x0 = jnp.clip(x0, -1.0, 1.0)
        if not return_every:
            return x0
        # Frame j is the state after j reverse steps, x_{T-j} in the paper's numbering.
        steps_taken = list(range(0, num_timesteps, return_every)) + [num_timesteps]
        chain = jnp.concatenate([x_T[None], chain[:-1], x0[None]], axis=0)
        return x0, chain[jnp.asarray(steps_taken)]

    return sample_fn
