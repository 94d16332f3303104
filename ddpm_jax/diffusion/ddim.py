"""DDIM (Song, Meng & Ermon 2021): its step (:func:`ddim_step`, their eq. 12), the chain from noise
(:func:`ddim_sample`) and the sampler built on it (:func:`make_ddim_sampler`), the deterministic decoder from a
given x_T (:func:`make_ddim_decoder`) and its inverse (:func:`ddim_invert`).

Usually run on a respaced schedule of K << T steps (:func:`ddpm_jax.diffusion.schedules.respace_betas`); with
classifier guidance, Dhariwal & Nichol's (2021) Algorithm 2.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.chain import (
    CondFn,
    Constrain,
    GuideEpsFn,
    chain_frames,
    constrainer,
    draw_x_T,
    eps_guide,
    on_training_timesteps,
    step_noise,
    unconstrained,
)
from ddpm_jax.diffusion.process import EpsModelFn, clip_x0, predict_x0_from_eps
from ddpm_jax.diffusion.schedules import DiffusionSchedule, extract


def ddim_step(schedule: DiffusionSchedule, x, t, eps, eta, clip_denoised: bool):
    """Mean, standard deviation and x_0 prediction of one DDIM step from index ``t`` to ``t - 1`` (Song et al. eq. 12).

    ``x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps + sigma_t z`` with
    ``sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})``; ``clip_denoised``
    clips x0_hat to [-1, 1] and uses the noise it implies, as improved-diffusion does. ``x``, ``eps``:
    ``(B, H, W, C)``, ``t`` int ``(B,)``; the standard deviation is ``(B, 1, 1, 1)``.
    """
    x0 = predict_x0_from_eps(schedule, x, t, eps)
    abar = extract(schedule.alpha_bars, t, x.ndim)
    abar_prev = extract(schedule.alpha_bars_prev, t, x.ndim)
    if clip_denoised:
        x0 = clip_x0(x0)
        eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)  # the noise the clipped x_0 implies
    # eta = 1: sigma^2 is beta-tilde, and the step is ancestral sampling's with the posterior variance.
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    mean = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    return mean, sigma, x0


def ddim_sample(
    eps_theta: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    schedule: DiffusionSchedule,
    key: jax.Array,
    shape: tuple[int, int, int, int],
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
    guide_eps: GuideEpsFn | None = None,
    constrain: Constrain = unconstrained,
    keep_chain: bool = False,
):
    """DDIM from x_T ~ N(0, I) down to x_0: Algorithm 2's loop (:func:`ddpm_jax.diffusion.ancestral.ancestral_sample`)
    with :func:`ddim_step` for line 4, one ``lax.scan`` over the indices T-1, ..., 0; x_0 is clipped to [-1, 1].

    The same key gives the same x_T and per-step noise as ancestral sampling. ``guide_eps(eps, x_t, t)``:
    classifier guidance's shifted noise estimate. Returns ``(x_0, x_T, chain)`` as ``ancestral_sample``.
    """
    x_T, noise_key = draw_x_T(key, shape, constrain)

    def step(x_t, i):
        t = jnp.full((shape[0],), i, dtype=jnp.int32)
        eps = eps_theta(x_t, t)
        chex.assert_equal_shape([eps, x_t])
        if guide_eps is not None:
            eps = guide_eps(eps, x_t, t)
        mean, sigma, _ = ddim_step(schedule, x_t, t, eps, eta, clip_denoised)
        z = step_noise(noise_key, i, shape)
        x_prev = constrain(mean + jnp.where(i > 0, sigma, 0.0) * z)  # no noise at the last step
        return x_prev, (x_prev if keep_chain else None)

    x_0, chain = jax.lax.scan(step, x_T, jnp.arange(schedule.num_timesteps - 1, -1, -1))
    return clip_x0(x_0), x_T, chain


def make_ddim_sampler(
    eps_fn: EpsModelFn,
    schedule: DiffusionSchedule,
    shape: tuple[int, int, int, int],
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
    return_every: int = 0,
    sharding: jax.sharding.Sharding | None = None,
    timesteps=None,
    cond_fn: CondFn | None = None,
) -> Callable[[Any, jax.Array], Any]:
    """DDIM sampling (Song, Meng & Ermon 2021: :func:`ddim_sample`), usually on a respaced schedule of K << T steps.

    ``x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1} - sigma_k^2) eps + sigma_k z`` with
    ``sigma_k = eta sqrt((1 - abar_{k-1}) / (1 - abar_k)) sqrt(1 - abar_k / abar_{k-1})``:
    ``eta = 0`` is deterministic (x_T alone fixes the sample: see :func:`ddim_invert`), ``eta = 1``
    is ancestral sampling with sigma^2 = beta-tilde. ``clip_denoised`` clips x0_hat to [-1, 1] and
    uses the noise it implies, as improved-diffusion does. ``cond_fn``: classifier guidance,
    ``eps - sqrt(1 - abar_t) cond_fn(variables, x_t, t)`` (Dhariwal & Nichol 2021, Algorithm 2).
    Other arguments and return value as :func:`ddpm_jax.diffusion.ancestral.make_ancestral_sampler`'s; the
    same key gives the same x_T and per-step noise.
    """
    chex.assert_equal(len(shape), 4)
    if not 0.0 <= eta:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: ancestral), got {eta}.")
    if return_every < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}.")
    eps_fn = on_training_timesteps(eps_fn, schedule, timesteps)
    cond_fn = on_training_timesteps(cond_fn, schedule, timesteps) if cond_fn is not None else None
    constrain = constrainer(sharding)

    def sample_fn(variables, key: jax.Array):
        x0, x_T, chain = ddim_sample(
            lambda x_t, t: eps_fn(variables, x_t, t), schedule, key, shape, eta=eta, clip_denoised=clip_denoised,
            guide_eps=eps_guide(cond_fn, variables, schedule), constrain=constrain, keep_chain=bool(return_every),
        )
        if not return_every:
            return x0
        return x0, chain_frames(x_T, chain, x0, schedule.num_timesteps, return_every)

    return sample_fn


def make_ddim_decoder(eps_fn: EpsModelFn, schedule: DiffusionSchedule, *, timesteps=None):
    """Deterministic DDIM (eta = 0, no clipping) from a given x_T: ``decode(variables, x_T) -> x_0``.

    The inverse of :func:`ddim_invert` up to the discretization of the
    probability-flow ODE; neither clips, so the pair is a smooth map.
    """
    eps_fn = on_training_timesteps(eps_fn, schedule, timesteps)

    def decode(variables, x_T):
        def reverse_step(x, i):
            t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
            mean, _, _ = ddim_step(schedule, x, t, eps_fn(variables, x, t), 0.0, False)
            return mean, None

        return jax.lax.scan(reverse_step, x_T, jnp.arange(schedule.num_timesteps - 1, -1, -1))[0]

    return decode


def ddim_invert(eps_fn: EpsModelFn, schedule: DiffusionSchedule, variables, x0: jnp.ndarray, *,
                timesteps=None, refine: int = 0):
    """DDIM inversion: the x_T from which deterministic DDIM (:func:`make_ddim_decoder`) returns ``x0``.

    Undoes the decoder's steps in reverse order, from ``x0`` (abar = 1) to the last
    timestep. Each decoder step ``x_{k-1} = sqrt(abar_{k-1}) x0_hat(x_k, e) + sqrt(1 - abar_{k-1}) e``
    uses the noise ``e = eps(x_k, k)`` at the point being solved for, so the inverse is
    implicit. ``refine = 0`` is the usual DDIM inversion (Song et al. 2021, sec. 4.3):
    ``e`` is taken at the known point ``x_{k-1}`` (timestep k-1; at the first step the
    network sees ``x0`` at timestep 0). Its error grows with the step size: decoding
    gives back ``x0`` only to first order. ``refine = r`` then re-evaluates ``e`` at the
    new point r times (fixed-point iteration), which converges to the exact inverse of
    the decoder where the network is smooth (r extra network calls per step).
    ``x0``: ``(B, H, W, C)``; returns x_T of the same shape.
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}.")
    eps_fn = on_training_timesteps(eps_fn, schedule, timesteps)
    abar, abar_prev = schedule.alpha_bars, schedule.alpha_bars_prev

    def undo_step(x_prev, k):
        def solve(e):  # x_k with x_{k-1} = decoder step of (x_k, e)
            x0_hat = (x_prev - jnp.sqrt(1.0 - abar_prev[k]) * e) / jnp.sqrt(abar_prev[k])
            return jnp.sqrt(abar[k]) * x0_hat + jnp.sqrt(1.0 - abar[k]) * e

        batch = (x_prev.shape[0],)
        e = eps_fn(variables, x_prev, jnp.full(batch, jnp.maximum(k - 1, 0), dtype=jnp.int32))
        t = jnp.full(batch, k, dtype=jnp.int32)
        e = jax.lax.fori_loop(0, refine, lambda _, e: eps_fn(variables, solve(e), t), e)
        return solve(e), None

    return jax.lax.scan(undo_step, x0, jnp.arange(schedule.num_timesteps))[0]
