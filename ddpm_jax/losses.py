"""Training objectives."""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import p_mean_variance, q_sample, split_learned_variance
from ddpm_jax.likelihood import vlb_term
from ddpm_jax.schedules import DiffusionSchedule

# eps_fn(x_t, t) -> (eps_hat, aux): the network's noise prediction, plus whatever
# the caller wants back (BatchNorm's updated statistics, say).
EpsWithAuxFn = Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, object]]


def noised_batch(schedule: DiffusionSchedule, x0: jnp.ndarray, key: jax.Array):
    """``(t, eps, x_t)``: ``t ~ Uniform{0..T-1}`` and ``eps ~ N(0, I)`` per image, ``x_t ~ q(x_t | x_0)``."""
    chex.assert_rank(x0, 4)
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape, dtype=x0.dtype)
    return t, noise, q_sample(schedule, x0, t, noise)


def min_snr_weights(schedule: DiffusionSchedule, t: jnp.ndarray, gamma: float) -> jnp.ndarray:
    """Min-SNR-gamma loss weights of an eps-predicting network (Hang et al. 2023, eq. 9), ``(B,)``.

    ``min(SNR_t, gamma) / SNR_t`` with ``SNR_t = abar_t / (1 - abar_t)``: 1 wherever the
    signal-to-noise ratio is at most gamma (the noisy timesteps), and ``gamma / SNR_t`` < 1 at the
    nearly clean ones, whose easy, conflicting gradients otherwise slow the rest down.
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma!r} (Hang et al.: 5).")
    abar = schedule.alpha_bars[t]
    snr = abar / (1.0 - abar)
    return jnp.minimum(snr, gamma) / snr


def l_simple(
    schedule: DiffusionSchedule, eps_fn: EpsWithAuxFn, x0: jnp.ndarray, key: jax.Array, min_snr_gamma: float | None = None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, object]:
    """L_simple (Ho et al. 2020, eq. 14; the report's eq. 16) for one batch; returns the scalar loss.

    Draws ``t ~ Uniform{0..T-1}`` and ``eps ~ N(0, I)`` per image and scores
    ``||eps - eps_hat(x_t, t)||^2``, averaged over pixels. With ``min_snr_gamma``
    each image's term is weighted by :func:`min_snr_weights` before the batch mean
    (the per-image losses returned stay the unweighted MSE, comparable across runs).

    Args:
      schedule: the diffusion tables.
      eps_fn: ``(x_t, t) -> (eps_hat, aux)``, ``eps_hat`` of ``x_t``'s shape.
      x0: clean images ``(B, H, W, C)`` in [-1, 1].
      key: PRNG key for t and the noise.

    Returns:
      ``(loss, per_image_loss (B,), t (B,), aux)``: the batch mean, each image's
      loss and timestep (for per-timestep logging), and ``eps_fn``'s aux.
    """
    t, noise, x_t = noised_batch(schedule, x0, key)
    eps_hat, aux = eps_fn(x_t, t)
    chex.assert_equal_shape([eps_hat, noise])
    per_image = jnp.mean(jnp.square(noise - eps_hat.astype(jnp.float32)), axis=(1, 2, 3))
    if min_snr_gamma is None:
        return jnp.mean(per_image), per_image, t, aux
    return jnp.mean(min_snr_weights(schedule, t, min_snr_gamma) * per_image), per_image, t, aux


def l_hybrid(
    schedule: DiffusionSchedule, model_fn: EpsWithAuxFn, x0: jnp.ndarray, key: jax.Array, vlb_weight: float = 0.001
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, object]:
    """L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1) for a learned-variance network.

    ``model_fn(x_t, t) -> (output, aux)`` with ``output`` ``(B, H, W, 2C)``: eps and v
    (:func:`ddpm_jax.diffusion.split_learned_variance`). L_simple trains eps as usual;
    the L_vlb term trains only the variance: it sees the mean through a stop-gradient
    (their sec. 3.1), so the mean keeps L_simple's gradient alone. L_vlb is estimated
    from the same (t, x_t) as T times that timestep's term L_t (KL, or the decoder's
    NLL at t = 0), in bits per dimension, as improved-diffusion does; ``vlb_weight``
    is lambda (0.001 in the paper). Same return values as :func:`l_simple`.
    """
    t, noise, x_t = noised_batch(schedule, x0, key)
    output, aux = model_fn(x_t, t)
    eps_hat, v = split_learned_variance(output.astype(jnp.float32))
    chex.assert_equal_shape([eps_hat, noise])
    mse = jnp.mean(jnp.square(noise - eps_hat), axis=(1, 2, 3))
    # The mean seen through a stop-gradient (improved-diffusion's frozen_out), unclipped (as in training
    # there: x_0 predictions are not clipped inside the loss).
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps_hat), v], axis=-1)
    term_nats = vlb_term(schedule, x0, x_t, t, p_mean_variance(schedule, x_t, t, frozen, "learned", mean_type="eps"))
    vlb_bits_per_dim = schedule.num_timesteps * term_nats / (x0[0].size * jnp.log(2.0))
    per_image = mse + vlb_weight * vlb_bits_per_dim
    return jnp.mean(per_image), per_image, t, aux
