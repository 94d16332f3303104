"""Samplers: pure functions of network variables and a PRNG key.

Each factory returns a function to ``jax.jit`` that runs the whole reverse
chain inside one ``lax.scan`` (no Python loop over timesteps).

Fewer steps than the network was trained with: pass a respaced schedule
(:func:`ddpm_jax.configs.schedule_from_config` with ``steps=K``) and, as
``timesteps``, the training timestep each of its K indices stands for; the
network is then called with those. Ancestral sampling on a respaced schedule
is Nichol & Dhariwal's (2021) respacing; :func:`make_ddim_sampler` is Song et
al.'s (2021) DDIM on the same schedules.

Classifier guidance (Dhariwal & Nichol 2021): both samplers take an optional
``cond_fn(variables, x_t, t) -> s grad log p(y | x_t, t)`` (see
:func:`ddpm_jax.guidance.classifier_grad_fn`), evaluated inside the jitted chain
at every step; classifier-free guidance is a guided ``eps_fn``
(:func:`ddpm_jax.guidance.classifier_free_fn`). ``variables`` is whatever the
functions take: network variables, or a :class:`ddpm_jax.guidance.GuidanceInputs`.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import (
    MEAN_TYPES,
    VARIANCE_TYPES,
    EpsModelFn,
    MeanType,
    VarianceType,
    p_mean_variance,
    predict_x0_from_eps,
)
from ddpm_jax.guidance import classifier_guided_eps, classifier_guided_mean
from ddpm_jax.schedules import DiffusionSchedule, extract

# cond_fn(variables, x_t, t) -> s * grad_x log p(y | x_t, t), x_t's shape (classifier guidance).
CondFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _on_training_timesteps(eps_fn: EpsModelFn, schedule: DiffusionSchedule, timesteps) -> EpsModelFn:
    """``eps_fn`` called with the training timestep each index of a respaced ``schedule`` stands for."""
    if timesteps is None:
        return eps_fn
    timesteps = jnp.asarray(timesteps, dtype=jnp.int32)
    chex.assert_shape(timesteps, (schedule.num_timesteps,))
    return lambda variables, x, t: eps_fn(variables, x, timesteps[t])


def _chain_frames(x_T, chain, x0, num_steps: int, return_every: int):
    """``(F, B, ...)``: x_T first, then the state after every ``return_every``-th step, x_0 last."""
    steps_taken = list(range(0, num_steps, return_every)) + [num_steps]
    chain = jnp.concatenate([x_T[None], chain[:-1], x0[None]], axis=0)
    return chain[jnp.asarray(steps_taken)]


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
    with ``z ~ N(0, I)`` except at the last step (``i = 0``), which adds no noise.

    Args:
      eps_fn: the network's noise prediction, ``(variables, x_t, t) -> eps``.
      schedule: the schedule the network was trained with.
      shape: ``(B, H, W, C)`` of the batch to draw.
      variance: sigma_t^2 = beta_t (``'beta'``) or beta-tilde_t (``'beta_tilde'``), or
        ``'learned'``: ``eps_fn`` then returns eps and v stacked on the channel axis and
        sigma_t^2 is :func:`ddpm_jax.diffusion.learned_log_variance`'s, per pixel.
      mean: ``'x0_clip'`` (clip the predicted x_0, then take the posterior
        mean; Ho et al.'s code) or ``'eps'`` (the report's eq. 14 literally).
      return_every: if k > 0, also return every k-th state of the chain.
      sharding: optional sharding of the batch (e.g. split over a data mesh,
        :func:`ddpm_jax.parallel.batch_sharded`); the chain stays in it, so every
        device runs the network on its share of the batch. The numbers drawn
        do not depend on it.
      timesteps: for a respaced ``schedule`` of K steps, the ``(K,)`` training
        timesteps its indices stand for (see the module docstring).
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
    num_timesteps = schedule.num_timesteps
    if return_every < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}.")
    eps_fn = _on_training_timesteps(eps_fn, schedule, timesteps)
    cond_fn = _on_training_timesteps(cond_fn, schedule, timesteps) if cond_fn is not None else None

    def step(variables, x, t, output, i):
        reverse = p_mean_variance(schedule, x, t, output, variance, mean)
        mu = reverse.mean
        if cond_fn is not None:
            mu = classifier_guided_mean(mu, jnp.square(reverse.std), cond_fn(variables, x, t))
        return mu, reverse.std

    # Frame j of the chain is the state after j reverse steps, x_{T-j} in the paper's numbering.
    return _reverse_chain(eps_fn, shape, num_timesteps, step, return_every, sharding)


def _constrainer(sharding):
    """``x -> x`` laid out as ``sharding`` (a ``NamedSharding`` over the batch axis) inside jit, or unchanged when
    ``sharding`` is None (one device)."""
    if sharding is None:
        return lambda x: x
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _reverse_chain(eps_fn: EpsModelFn, shape, num_steps: int, step, return_every: int, sharding):
    """``sample_fn(variables, key)`` running x_T ~ N(0, I) down to x_0 in one ``lax.scan``.

    ``step(variables, x, t, output, i) -> (mean, sigma)`` is the sampler's reverse step at
    index ``i`` given the network's output there
    (``t`` its ``(B,)`` broadcast); ``x_{i-1} = mean + sigma z``, with no noise at
    ``i = 0``. x_T comes from the key's first half and step ``i``'s noise from
    ``fold_in(second half, i)``, so samplers given the same key draw the same numbers.
    """

    constrain = _constrainer(sharding)

    def sample_fn(variables, key: jax.Array):
        init_key, step_key = jax.random.split(key)
        x_T = constrain(jax.random.normal(init_key, shape, dtype=jnp.float32))

        def reverse_step(x, i):
            t = jnp.full((shape[0],), i, dtype=jnp.int32)
            mean, sigma = step(variables, x, t, eps_fn(variables, x, t), i)
            z = jax.random.normal(jax.random.fold_in(step_key, i), shape, dtype=jnp.float32)
            x_prev = constrain(mean + jnp.where(i > 0, sigma, 0.0) * z)
            return x_prev, (x_prev if return_every else None)

        x0, chain = jax.lax.scan(reverse_step, x_T, jnp.arange(num_steps - 1, -1, -1))
        x0 = jnp.clip(x0, -1.0, 1.0)
        if not return_every:
            return x0
        return x0, _chain_frames(x_T, chain, x0, num_steps, return_every)

    return sample_fn


def _ddim_step(schedule: DiffusionSchedule, x, t, eps, eta, clip_denoised: bool):
    """Mean, standard deviation and x_0 prediction of one DDIM step from index ``t`` to ``t - 1`` (Song et al. eq. 12)."""
    x0 = predict_x0_from_eps(schedule, x, t, eps)
    abar = extract(schedule.alpha_bars, t, x.ndim)
    abar_prev = extract(schedule.alpha_bars_prev, t, x.ndim)
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)  # the noise the clipped x_0 implies
    # eta = 1: sigma^2 is beta-tilde, and the step is ancestral sampling's with the posterior variance.
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    mean = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    return mean, sigma, x0


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
    """DDIM sampling (Song, Meng & Ermon 2021), usually on a respaced schedule of K << T steps.

    ``x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1} - sigma_k^2) eps + sigma_k z`` with
    ``sigma_k = eta sqrt((1 - abar_{k-1}) / (1 - abar_k)) sqrt(1 - abar_k / abar_{k-1})``:
    ``eta = 0`` is deterministic (x_T alone fixes the sample: see :func:`ddim_invert`), ``eta = 1``
    is ancestral sampling with sigma^2 = beta-tilde. ``clip_denoised`` clips x0_hat to [-1, 1] and
    uses the noise it implies, as improved-diffusion does. ``cond_fn``: classifier guidance,
    ``eps - sqrt(1 - abar_t) cond_fn(variables, x_t, t)`` (Dhariwal & Nichol 2021, Algorithm 2).
    Other arguments and return value as :func:`make_ancestral_sampler`'s; the same key gives
    the same x_T and per-step noise.
    """
    chex.assert_equal(len(shape), 4)
    if not 0.0 <= eta:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: ancestral), got {eta}.")
    if return_every < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}.")
    eps_fn = _on_training_timesteps(eps_fn, schedule, timesteps)
    cond_fn = _on_training_timesteps(cond_fn, schedule, timesteps) if cond_fn is not None else None

    def step(variables, x, t, eps, i):
        chex.assert_equal_shape([eps, x])
        if cond_fn is not None:
            eps = classifier_guided_eps(eps, extract(schedule.alpha_bars, t, x.ndim), cond_fn(variables, x, t))
        mean, sigma, _ = _ddim_step(schedule, x, t, eps, eta, clip_denoised)
        return mean, sigma

    return _reverse_chain(eps_fn, shape, schedule.num_timesteps, step, return_every, sharding)


def make_ddim_decoder(eps_fn: EpsModelFn, schedule: DiffusionSchedule, *, timesteps=None):
    """Deterministic DDIM (eta = 0, no clipping) from a given x_T: ``decode(variables, x_T) -> x_0``.

    The inverse of :func:`ddim_invert` up to the discretization of the
    probability-flow ODE; neither clips, so the pair is a smooth map.
    """
    eps_fn = _on_training_timesteps(eps_fn, schedule, timesteps)

    def decode(variables, x_T):
        def reverse_step(x, i):
            t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
            mean, _, _ = _ddim_step(schedule, x, t, eps_fn(variables, x, t), 0.0, False)
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
    eps_fn = _on_training_timesteps(eps_fn, schedule, timesteps)
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


def _dpm_solver_chain(eps_fn: EpsModelFn, schedule: DiffusionSchedule, coefficients: dict, clip_denoised: bool,
                      cond_fn: CondFn | None, constrain=_constrainer(None)):
    """``chain(variables, x_T, noise_key, keep_states) -> (x, states)``: the K solver steps from ``x_T`` in one
    ``lax.scan``; ``x`` is the last state (unclipped), ``states`` ``(K, ...)`` the state after each step (None
    unless ``keep_states``)."""
    num_steps = schedule.num_timesteps
    a, w, noise = (jnp.asarray(coefficients[k], jnp.float32) for k in ("a", "w", "noise"))
    stochastic = bool(np.any(coefficients["noise"]))

    def chain(variables, x_T, noise_key, keep_states: bool = True):
        batch = (x_T.shape[0],)

        def solver_step(carry, j):
            x, m1, m2 = carry
            i = num_steps - 1 - j
            t = jnp.full(batch, i, dtype=jnp.int32)
            eps = eps_fn(variables, x, t)
            chex.assert_equal_shape([eps, x])
            if cond_fn is not None:
                eps = classifier_guided_eps(eps, extract(schedule.alpha_bars, t, x.ndim), cond_fn(variables, x, t))
            m0 = predict_x0_from_eps(schedule, x, t, eps)
            if clip_denoised:
                m0 = jnp.clip(m0, -1.0, 1.0)
            x_next = a[j] * x + w[j, 0] * m0 + w[j, 1] * m1 + w[j, 2] * m2
            if stochastic:
                x_next = x_next + noise[j] * jax.random.normal(jax.random.fold_in(noise_key, i), x.shape, x.dtype)
            x_next = constrain(x_next)
            return (x_next, m0, m1), (x_next if keep_states else None)

        zeros = jnp.zeros_like(x_T)
        (x, _, _), states = jax.lax.scan(solver_step, (x_T, zeros, zeros), jnp.arange(num_steps))
        return x, states

    return chain


def make_dpm_solver_decoder(eps_fn: EpsModelFn, schedule: DiffusionSchedule, *, order: int = 2,
                            clip_denoised: bool = True, lower_order_final: bool = True, timesteps=None):
    """Deterministic DPM-Solver++ from a given x_T: ``decode(variables, x_T) -> (x_0, states)``, ``states``
    ``(K, B, ...)`` the state after each of the K steps (the last is x_0, not clipped again)."""
    coefficients = dpm_solver_coefficients(np.asarray(schedule.alpha_bars), order,
                                           lower_order_final=lower_order_final)
    chain = _dpm_solver_chain(_on_training_timesteps(eps_fn, schedule, timesteps), schedule, coefficients,
                              clip_denoised, None)
    return lambda variables, x_T: chain(variables, x_T, None)


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
    classifier guidance on eps, as :func:`make_ddim_sampler`'s; classifier-free guidance is a guided
    ``eps_fn``. The last step goes to clean data (abar = 1) and returns its x_0 prediction. Other
    arguments and the return value as :func:`make_ancestral_sampler`'s; the same key gives the same
    x_T (and, stochastic, the same per-step noise).
    """
    chex.assert_equal(len(shape), 4)
    if return_every < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}.")
    coefficients = dpm_solver_coefficients(np.asarray(schedule.alpha_bars), order, stochastic=stochastic,
                                           lower_order_final=lower_order_final)
    eps_fn = _on_training_timesteps(eps_fn, schedule, timesteps)
    cond_fn = _on_training_timesteps(cond_fn, schedule, timesteps) if cond_fn is not None else None

    constrain = _constrainer(sharding)

    chain = _dpm_solver_chain(eps_fn, schedule, coefficients, clip_denoised, cond_fn, constrain)

    def sample_fn(variables, key: jax.Array):
        init_key, step_key = jax.random.split(key)
        x_T = constrain(jax.random.normal(init_key, shape, dtype=jnp.float32))
        x0, states = chain(variables, x_T, step_key, keep_states=bool(return_every))
        x0 = jnp.clip(x0, -1.0, 1.0)
        if not return_every:
            return x0
        return x0, _chain_frames(x_T, states, x0, schedule.num_timesteps, return_every)

    return sample_fn
