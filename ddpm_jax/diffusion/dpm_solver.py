"""DPM-Solver++ (Lu et al. 2022), multistep, with data prediction: the order of each step
(:func:`dpm_solver_orders`), its coefficients on a discrete schedule (:func:`dpm_solver_coefficients`,
computed once in float64), the solver's loop (:func:`dpm_solver_solve`), and the sampler and the deterministic
decoder built on it (:func:`make_dpm_solver_sampler`, :func:`make_dpm_solver_decoder`).

Usually run on a respaced schedule of K << T steps (:func:`ddpm_jax.diffusion.schedules.spaced_timesteps`).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

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
from ddpm_jax.diffusion.schedules import DiffusionSchedule

DPM_SOLVER_ORDERS = (1, 2, 3)


def dpm_solver_orders(num_steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """The order of each of a K-step DPM-Solver++ run's steps, first step first, as diffusers'
    ``DPMSolverMultistepScheduler`` chooses them: a multistep method starts at order 1 (it has no
    earlier predictions yet) and climbs by one per step up to ``order``; the last step, the one to
    clean data, is first order; with fewer than 15 steps (``lower_order_final``) the one before it is
    at most second order, which Lu et al. found steadier for few steps.
    """
    if order not in DPM_SOLVER_ORDERS:
        raise ValueError(f"DPM-Solver++ order must be one of {DPM_SOLVER_ORDERS}, got {order!r}.")
    orders = []
    for j in range(num_steps):
        cap = min(order, j + 1)
        if j == num_steps - 1:
            cap = 1
        elif j == num_steps - 2 and lower_order_final and num_steps < 15:
            cap = min(cap, 2)
        orders.append(cap)
    return orders


def dpm_solver_coefficients(alpha_bars, order: int, *, stochastic: bool = False,
                            lower_order_final: bool = True) -> dict[str, np.ndarray]:
    """Per-step coefficients of DPM-Solver++ (Lu et al. 2022) on a discrete schedule, float64 ``(K, ...)``.

    ``alpha_bars`` ``(K,)``: abar at the K timesteps visited (ascending timesteps; the solver runs from
    the last down, then steps to clean data, abar = 1). With alpha = sqrt(abar), sigma = sqrt(1 - abar),
    lambda = log(alpha / sigma), step j goes from s_0 to t with ``h = lambda_t - lambda_{s_0}`` and the
    data predictions ``m_0, m_1, m_2`` at s_0 and the two timesteps before it. Its update is linear in
    them: ``x_t = a x + w_0 m_0 + w_1 m_1 + w_2 m_2 + noise z``, with the multistep formulas of the
    paper's Algorithm 2 (and Appendix B, order 3) in diffusers' 'midpoint' form for order 2, and for
    ``stochastic`` the SDE-DPM-Solver++ updates (orders 1 and 2). Returns ``{'a': (K,), 'w': (K, 3),
    'noise': (K,), 'order': (K,)}`` indexed by step j (from the noisiest timestep), so the first row
    belongs to timestep index K-1.
    """
    abar = np.asarray(alpha_bars, dtype=np.float64)
    num_steps = len(abar)
    if stochastic and order == 3:
        raise ValueError("SDE-DPM-Solver++ has orders 1 and 2 (Lu et al. 2022); use order=2.")
    orders = dpm_solver_orders(num_steps, order, lower_order_final)
    # Visiting order: index K-1 first, then down to 0, then the clean end (abar = 1, lambda = +inf).
    abar_from = abar[::-1]
    abar_to = np.append(abar[::-1][1:], 1.0)
    lam = lambda ab: 0.5 * (np.log(ab) - np.log1p(-ab)) if ab < 1.0 else np.inf  # noqa: E731
    a, w, noise = np.zeros(num_steps), np.zeros((num_steps, 3)), np.zeros(num_steps)
    for j in range(num_steps):
        alpha_t, sigma_t = np.sqrt(abar_to[j]), np.sqrt(1.0 - abar_to[j])
        sigma_s = np.sqrt(1.0 - abar_from[j])
        h = lam(abar_to[j]) - lam(abar_from[j])
        em1 = np.expm1(-h)  # e^{-h} - 1, exactly -1 at the clean end
        d0 = np.array([1.0, 0.0, 0.0])
        if orders[j] >= 2:
            r0 = (lam(abar_from[j]) - lam(abar_from[j - 1])) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        if orders[j] == 3:
            r1 = (lam(abar_from[j - 1]) - lam(abar_from[j - 2])) / h
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
        if stochastic:
            decay = np.exp(-h)
            a[j] = sigma_t / sigma_s * decay
            w[j] = alpha_t * -np.expm1(-2.0 * h) * (d0 + (0.5 * d1_0 if orders[j] == 2 else 0.0))
            noise[j] = sigma_t * np.sqrt(-np.expm1(-2.0 * h))
        else:
            a[j] = sigma_t / sigma_s
            w[j] = -alpha_t * em1 * d0
            if orders[j] == 2:
                w[j] += -0.5 * alpha_t * em1 * d1_0
            elif orders[j] == 3:
                w[j] += alpha_t * (em1 / h + 1.0) * d1 - alpha_t * ((em1 + h) / h**2 - 0.5) * d2
    return {"a": a, "w": w, "noise": noise, "order": np.asarray(orders)}


def dpm_solver_solve(
    eps_theta: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    schedule: DiffusionSchedule,
    coefficients: dict,
    x_T: jnp.ndarray,
    noise_key: jax.Array | None = None,
    *,
    clip_denoised: bool = True,
    guide_eps: GuideEpsFn | None = None,
    constrain: Constrain = unconstrained,
    keep_states: bool = True,
):
    """The K steps of DPM-Solver++ from ``x_T`` ``(B, H, W, C)``, one ``lax.scan``; returns ``(x, states)``.

    Step j, at the index i = K-1-j: the data prediction ``m_0`` at x (clipped to [-1, 1] if ``clip_denoised``),
    then ``x = a x + w_0 m_0 + w_1 m_1 + w_2 m_2 (+ noise z)`` with step j's ``coefficients``
    (:func:`dpm_solver_coefficients`; z from ``noise_key``, :func:`ddpm_jax.diffusion.chain.step_noise`, where
    they have noise). ``x``: the last state (unclipped); ``states`` ``(K, B, H, W, C)``: the state after each
    step (None unless ``keep_states``). ``guide_eps(eps, x_t, t)``: classifier guidance's shifted noise estimate.
    """
    num_steps = schedule.num_timesteps
    a, w, noise = (jnp.asarray(coefficients[k], jnp.float32) for k in ("a", "w", "noise"))
    stochastic = bool(np.any(coefficients["noise"]))
    batch = (x_T.shape[0],)

    def solver_step(carry, j):
        x, m1, m2 = carry
        i = num_steps - 1 - j
        t = jnp.full(batch, i, dtype=jnp.int32)
        eps = eps_theta(x, t)
        chex.assert_equal_shape([eps, x])
        if guide_eps is not None:
            eps = guide_eps(eps, x, t)
        m0 = predict_x0_from_eps(schedule, x, t, eps)
        if clip_denoised:
            m0 = clip_x0(m0)
        x_next = a[j] * x + w[j, 0] * m0 + w[j, 1] * m1 + w[j, 2] * m2
        if stochastic:
            x_next = x_next + noise[j] * step_noise(noise_key, i, x.shape, x.dtype)
        x_next = constrain(x_next)
        return (x_next, m0, m1), (x_next if keep_states else None)

    zeros = jnp.zeros_like(x_T)
    (x, _, _), states = jax.lax.scan(solver_step, (x_T, zeros, zeros), jnp.arange(num_steps))
    return x, states


def make_dpm_solver_decoder(eps_fn: EpsModelFn, schedule: DiffusionSchedule, *, order: int = 2,
                            clip_denoised: bool = True, lower_order_final: bool = True, timesteps=None):
    """Deterministic DPM-Solver++ from a given x_T: ``decode(variables, x_T) -> (x_0, states)``, ``states``
    ``(K, B, ...)`` the state after each of the K steps (the last is x_0, not clipped again)."""
    coefficients = dpm_solver_coefficients(np.asarray(schedule.alpha_bars), order,
                                           lower_order_final=lower_order_final)
    eps_fn = on_training_timesteps(eps_fn, schedule, timesteps)
    return lambda variables, x_T: dpm_solver_solve(lambda x_t, t: eps_fn(variables, x_t, t), schedule, coefficients,
                                                   x_T, clip_denoised=clip_denoised)


def make_dpm_solver_sampler(
    eps_fn: EpsModelFn,
    schedule: DiffusionSchedule,
    shape: tuple[int, int, int, int],
    *,
    order: int = 2,
    stochastic: bool = False,
    clip_denoised: bool = True,
    lower_order_final: bool = True,
    return_every: int = 0,
    sharding: jax.sharding.Sharding | None = None,
    timesteps=None,
    cond_fn: CondFn | None = None,
) -> Callable[[Any, jax.Array], Any]:
    """DPM-Solver++ (Lu et al. 2022), multistep, with data prediction: K network calls for K steps.

    A solver of the probability-flow ODE (or, ``stochastic``, of the SDE: SDE-DPM-Solver++) in
    log-SNR, usually on a respaced ``schedule`` of K << T steps; each step uses the x_0 predictions
    of up to ``order`` timesteps (:func:`dpm_solver_coefficients`, :func:`dpm_solver_orders`). Order 1
    is deterministic DDIM. ``clip_denoised`` clips each predicted x_0 to [-1, 1] (diffusers'
    ``thresholding`` with ``sample_max_value=1``), as the other samplers clip theirs. ``cond_fn``:
    classifier guidance on eps, as :func:`ddpm_jax.diffusion.ddim.make_ddim_sampler`'s; classifier-free
    guidance is a guided ``eps_fn``. The last step goes to clean data (abar = 1) and returns its x_0
    prediction. Other arguments and the return value as
    :func:`ddpm_jax.diffusion.ancestral.make_ancestral_sampler`'s; the same key gives the same x_T (and,
    stochastic, the same per-step noise).
    """
    chex.assert_equal(len(shape), 4)
    if return_every < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}.")
    coefficients = dpm_solver_coefficients(np.asarray(schedule.alpha_bars), order, stochastic=stochastic,
                                           lower_order_final=lower_order_final)
    eps_fn = on_training_timesteps(eps_fn, schedule, timesteps)
    cond_fn = on_training_timesteps(cond_fn, schedule, timesteps) if cond_fn is not None else None
    constrain = constrainer(sharding)

    def sample_fn(variables, key: jax.Array):
        x_T, noise_key = draw_x_T(key, shape, constrain)
        x, states = dpm_solver_solve(
            lambda x_t, t: eps_fn(variables, x_t, t), schedule, coefficients, x_T, noise_key,
            clip_denoised=clip_denoised, guide_eps=eps_guide(cond_fn, variables, schedule), constrain=constrain,
            keep_states=bool(return_every),
        )
        x0 = clip_x0(x)
        if not return_every:
            return x0
        return x0, chain_frames(x_T, states, x0, schedule.num_timesteps, return_every)

    return sample_fn
