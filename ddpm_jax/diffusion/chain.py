"""What the samplers' reverse chains share: x_T and each step's noise from one key, the network called at a
respaced schedule's training timesteps, the batch kept in its sharding, classifier guidance of the steps that
take a noise estimate (DDIM, DPM-Solver++), and the frames of a chain.

Every sampler draws x_T from the first half of its key and the noise of step ``i`` (0-based) from
``fold_in(second half, i)`` (:func:`draw_x_T`, :func:`step_noise`), so samplers given the same key draw the
same numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.guidance import classifier_guided_eps
from ddpm_jax.diffusion.schedules import DiffusionSchedule, extract

# cond_fn(variables, x_t, t) -> s * grad_x log p(y | x_t, t), x_t's shape (classifier guidance).
CondFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]
# guide(mu, sigma, x_t, t) -> the guided mean of an ancestral step, x_t's shape (Dhariwal & Nichol's Algorithm 1).
GuideMeanFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
# guide_eps(eps, x_t, t) -> the guided noise estimate of a DDIM or DPM-Solver++ step (their Algorithm 2).
GuideEpsFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
# constrain(x) -> x laid out as the batch is sharded (inside jit).
Constrain = Callable[[jnp.ndarray], jnp.ndarray]


def unconstrained(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` as it is: the :data:`Constrain` of one device."""
    return x


def constrainer(sharding: jax.sharding.Sharding | None) -> Constrain:
    """``x -> x`` laid out as ``sharding`` (a ``NamedSharding`` over the batch axis) inside jit, or
    :func:`unconstrained` when ``sharding`` is None (one device)."""
    if sharding is None:
        return unconstrained
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def on_training_timesteps(fn: Callable, schedule: DiffusionSchedule, timesteps) -> Callable:
    """``fn(variables, x, t)`` called with the training timestep each index of a respaced ``schedule`` stands for.

    Respacing (Nichol & Dhariwal 2021, section 4; :func:`ddpm_jax.diffusion.schedules.respace_betas`) samples on
    K of the network's T training timesteps, ``timesteps`` int ``(K,)``
    (:func:`ddpm_jax.diffusion.schedules.spaced_timesteps`); the network is called with those. ``timesteps``
    None: every timestep kept, ``fn`` itself.
    """
    if timesteps is None:
        return fn
    timesteps = jnp.asarray(timesteps, dtype=jnp.int32)
    chex.assert_shape(timesteps, (schedule.num_timesteps,))
    return lambda variables, x, t: fn(variables, x, timesteps[t])


def eps_guide(cond_fn: CondFn | None, variables, schedule: DiffusionSchedule) -> GuideEpsFn | None:
    """The ``guide_eps`` of a DDIM or DPM-Solver++ step under classifier guidance (Dhariwal & Nichol's Algorithm 2):
    ``eps - sqrt(1 - abar_t) cond_fn(variables, x_t, t)``; None without ``cond_fn``."""
    if cond_fn is None:
        return None
    return lambda eps, x_t, t: classifier_guided_eps(eps, extract(schedule.alpha_bars, t, x_t.ndim),
                                                     cond_fn(variables, x_t, t))


def draw_x_T(key: jax.Array, shape: tuple[int, ...], constrain: Constrain = unconstrained):
    """``(x_T, noise_key)``: x_T ~ N(0, I) float32 of ``shape`` from the key's first half, and its second half,
    from which :func:`step_noise` draws each step's noise."""
    init_key, noise_key = jax.random.split(key)
    return constrain(jax.random.normal(init_key, shape, dtype=jnp.float32)), noise_key


def step_noise(noise_key: jax.Array, i, shape: tuple[int, ...], dtype=jnp.float32) -> jnp.ndarray:
    """z ~ N(0, I) of ``shape`` for the step at 0-based index ``i``: from ``fold_in(noise_key, i)``."""
    return jax.random.normal(jax.random.fold_in(noise_key, i), shape, dtype=dtype)


def chain_frames(x_T, chain, x0, num_steps: int, return_every: int):
    """``(F, B, ...)``: x_T first, then the state after every ``return_every``-th step, x_0 last.

    ``chain``: ``(num_steps, B, ...)``, the state after each step (``chain[j]`` after j + 1 steps, x_{T-j-1} in
    the paper's numbering); ``x0``: the finished (clipped) sample, which replaces the last state.
    """
    steps_taken = list(range(0, num_steps, return_every)) + [num_steps]
    chain = jnp.concatenate([x_T[None], chain[:-1], x0[None]], axis=0)
    return chain[jnp.asarray(steps_taken)]
