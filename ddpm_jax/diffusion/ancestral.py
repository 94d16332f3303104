"""Ancestral sampling: Ho et al. 2020, Algorithm 2 (:func:`ancestral_sample`), and the sampler built on it
(:func:`make_ancestral_sampler`: jit-ready, respaced, guided, with frames of the chain).

On a respaced schedule (:func:`ddpm_jax.diffusion.schedules.respace_betas`) it is Nichol & Dhariwal's (2021)
respacing; with classifier guidance, Dhariwal & Nichol's (2021) Algorithm 1.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.chain import (
    CondFn,
    Constrain,
    GuideMeanFn,
    chain_frames,
    constrainer,
    draw_x_T,
    on_training_timesteps,
    step_noise,
    unconstrained,
)
from ddpm_jax.diffusion.guidance import classifier_guided_mean
from ddpm_jax.diffusion.process import (
    MEAN_TYPES,
    VARIANCE_TYPES,
    EpsModelFn,
    MeanType,
    VarianceType,
    clip_x0,
    eps_and_sigma,
    p_mean,
)
from ddpm_jax.diffusion.schedules import DiffusionSchedule


def ancestral_sample(
    eps_theta: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    schedule: DiffusionSchedule,
    key: jax.Array,
    shape: tuple[int, int, int, int],
    *,
    variance: VarianceType = "beta",
    mean: MeanType = "x0_clip",
    guide: GuideMeanFn | None = None,
    constrain: Constrain = unconstrained,
    keep_chain: bool = False,
):
    """Ho et al. 2020, Algorithm 2 (sampling), for ``eps_theta(x_t, t)``, t int ``(B,)`` 0-based:

        1: x_T ~ N(0, I)
        2: for t = T, ..., 1 do
        3:   z ~ N(0, I) if t > 1, else z = 0
        4:   x_{t-1} = 1 / sqrt(alpha_t) (x_t - (1 - alpha_t) / sqrt(1 - abar_t) eps_theta(x_t, t)) + sigma_t z
        5: end for
        6: return x_0

    Line 2 is one ``lax.scan`` over the indices i = t - 1 = T-1, ..., 0. Line 4's mean is eq. 11, or, ``mean``
    ``'x0_clip'``, the same through the clipped x_0 it predicts (:func:`ddpm_jax.diffusion.process.p_mean`);
    sigma_t^2 = beta_t or beta-tilde_t (sec. 3.2), or the network's own (``variance='learned'``: its output
    stacks eps and v; :func:`ddpm_jax.diffusion.process.eps_and_sigma`). The returned x_0 is clipped to
    [-1, 1]. ``guide(mu, sigma, x_t, t)``: classifier guidance's shifted mean; ``constrain``: the batch's
    sharding, kept at every step. x_T and each z come from ``key`` (:func:`ddpm_jax.diffusion.chain.draw_x_T`).

    Returns ``(x_0, x_T, chain)``, each ``shape`` but ``chain`` ``(T,) + shape``: the state after each step
    (None unless ``keep_chain``).
    """
    x_T, noise_key = draw_x_T(key, shape, constrain)  # 1

    def step(x_t, i):  # 2: t = i + 1
        t = jnp.full((shape[0],), i, dtype=jnp.int32)
        eps, sigma = eps_and_sigma(schedule, t, eps_theta(x_t, t), variance)  # eps_theta(x_t, t), sigma_t
        chex.assert_equal_shape([eps, x_t])
        mu = p_mean(schedule, x_t, t, eps, mean)  # eq. 11
        if guide is not None:
            mu = guide(mu, sigma, x_t, t)
        z = step_noise(noise_key, i, shape)  # 3: z ~ N(0, I); z = 0 at t = 1 (i = 0), below
        x_prev = constrain(mu + jnp.where(i > 0, sigma, 0.0) * z)  # 4
        return x_prev, (x_prev if keep_chain else None)

    x_0, chain = jax.lax.scan(step, x_T, jnp.arange(schedule.num_timesteps - 1, -1, -1))  # 5
    return clip_x0(x_0), x_T, chain  # 6


def make_ancestral_sampler(
    eps_fn: EpsModelFn,
    schedule: DiffusionSchedule,
    shape: tuple[int, int, int, int],
    *,
    variance: VarianceType = "beta",
    mean: MeanType = "x0_clip",
    return_every: int = 0,
    sharding: jax.sharding.Sharding | None = None,
    timesteps=None,
    cond_fn: CondFn | None = None,
) -> Callable[[Any, jax.Array], Any]:
    """Build ancestral sampling (Ho et al. 2020, Algorithm 2); returns ``sample_fn(variables, key) -> x_0``, jittable.

    ``x_T ~ N(0, I)``; for ``i = T-1 .. 0``: ``x_{i} = mu(x_{i+1}, i) + sigma_i z``
    with ``z ~ N(0, I)`` except at the last step (``i = 0``), which adds no noise: :func:`ancestral_sample`, here
    called with the network's ``variables``, on the training timesteps of a respaced schedule, with classifier
    guidance and the chain's frames.

    Args:
      eps_fn: the network's noise prediction, ``(variables, x_t, t) -> eps``.
      schedule: the schedule the network was trained with, or a respaced one of K steps (with ``timesteps``).
      shape: ``(B, H, W, C)`` of the batch to draw.
      variance: sigma_t^2 = beta_t (``'beta'``) or beta-tilde_t (``'beta_tilde'``), or
        ``'learned'``: ``eps_fn`` then returns eps and v stacked on the channel axis and
        sigma_t^2 is :func:`ddpm_jax.diffusion.learned_log_variance`'s, per pixel.
      mean: ``'x0_clip'`` (clip the predicted x_0, then take the posterior
        mean; Ho et al.'s code) or ``'eps'`` (the report's eq. 14 literally).
      return_every: if k > 0, also return every k-th state of the chain.
      sharding: optional sharding of the batch (e.g. split over a data mesh,
        :func:`ddpm_jax.utils.parallel.batch_sharded`); the chain stays in it, so every
        device runs the network on its share of the batch. The numbers drawn
        do not depend on it.
      timesteps: for a respaced ``schedule`` of K steps, the ``(K,)`` training
        timesteps its indices stand for (:func:`ddpm_jax.diffusion.chain.on_training_timesteps`).
      cond_fn: classifier guidance: every step's mean is shifted by
        ``sigma_t^2 * cond_fn(variables, x_t, t)`` (Dhariwal & Nichol 2021, Algorithm 1).

    Returns:
      ``sample_fn(variables, key)`` giving ``x_0`` of ``shape`` in [-1, 1]; with
      ``return_every=k`` it gives ``(x_0, frames)`` where ``frames`` has shape
      ``(F, B, H, W, C)``: ``x_T`` (pure noise) first, then the state after every
      k-th step, and the final (clipped) ``x_0`` last.
    """
    chex.assert_equal(len(shape), 4)
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCE_TYPES)}.")
    if mean not in MEAN_TYPES:
        raise ValueError(f"unknown mean_type {mean!r}; allowed: {', '.join(MEAN_TYPES)}.")
    if return_every < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}.")
    eps_fn = on_training_timesteps(eps_fn, schedule, timesteps)
    cond_fn = on_training_timesteps(cond_fn, schedule, timesteps) if cond_fn is not None else None
    constrain = constrainer(sharding)

    def sample_fn(variables, key: jax.Array):
        def guide(mu, sigma, x_t, t):  # Dhariwal & Nichol's Algorithm 1: mu + Sigma s grad log p(y | x_t)
            return classifier_guided_mean(mu, jnp.square(sigma), cond_fn(variables, x_t, t))

        x0, x_T, chain = ancestral_sample(
            lambda x_t, t: eps_fn(variables, x_t, t), schedule, key, shape, variance=variance, mean=mean,
            guide=guide if cond_fn is not None else None, constrain=constrain, keep_chain=bool(return_every),
        )
        if not return_every:
            return x0
        return x0, chain_frames(x_T, chain, x0, schedule.num_timesteps, return_every)

    return sample_fn
