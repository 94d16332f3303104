"""Training objectives: Ho et al. 2020's Algorithm 1 (:func:`training_loss`), with the pieces it may add: the
min-SNR weighting (:func:`min_snr_weights`) and L_hybrid's L_vlb term (:func:`hybrid_vlb_term`).
:func:`l_simple` and :func:`l_hybrid` are its two objectives by name."""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.likelihood import vlb_term
from ddpm_jax.diffusion.process import p_mean_variance, q_sample, split_learned_variance
from ddpm_jax.diffusion.schedules import DiffusionSchedule

# eps_fn(x_t, t) -> (eps_hat, aux): the network's noise prediction, plus whatever
# the caller wants back (BatchNorm's updated statistics, say).
EpsWithAuxFn = Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, object]]


def training_loss(
    schedule: DiffusionSchedule, eps_theta: EpsWithAuxFn, x0: jnp.ndarray, key: jax.Array, *,
    min_snr_gamma: float | None = None, hybrid_lambda: float | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, object]:
    """Ho et al. 2020, Algorithm 1 (training), lines 3-5, for a batch ``x0`` ``(B, H, W, C)`` in [-1, 1]:

        3: t ~ Uniform({1, ..., T})
        4: eps ~ N(0, I)
        5: gradient step on ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2

    per image (t 0-based here), the squared error averaged over pixels: L_simple, eq. 14. ``eps_theta(x_t, t)
    -> (output, aux)``. ``min_snr_gamma``: each image's error weighted by :func:`min_snr_weights` before the
    batch mean. ``hybrid_lambda``: L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021) for a network
    whose output stacks eps and v (:func:`hybrid_vlb_term`); the two are not combined.

    Returns ``(loss, per_image (B,), t (B,), aux)``: the batch mean, each image's loss, unweighted (comparable
    across runs), and timestep (for per-timestep logging), and ``eps_theta``'s aux.
    """
    chex.assert_rank(x0, 4)
    if min_snr_gamma is not None and hybrid_lambda is not None:
        raise ValueError("min-SNR weights L_simple alone; L_hybrid (hybrid_lambda) has its own weighting.")
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)  # 3
    eps = jax.random.normal(noise_key, x0.shape, dtype=x0.dtype)  # 4
    x_t = q_sample(schedule, x0, t, eps)  # sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4)
    output, aux = eps_theta(x_t, t)
    output = output.astype(jnp.float32)
    eps_hat, v = split_learned_variance(output) if hybrid_lambda is not None else (output, None)
    chex.assert_equal_shape([eps_hat, eps])
    per_image = jnp.mean(jnp.square(eps - eps_hat), axis=(1, 2, 3))  # 5: eq. 14
    if hybrid_lambda is not None:
        per_image = per_image + hybrid_lambda * hybrid_vlb_term(schedule, x0, x_t, t, eps_hat, v)
    if min_snr_gamma is None:
        return jnp.mean(per_image), per_image, t, aux
    return jnp.mean(min_snr_weights(schedule, t, min_snr_gamma) * per_image), per_image, t, aux


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


def hybrid_vlb_term(schedule: DiffusionSchedule, x0, x_t, t, eps_hat, v) -> jnp.ndarray:
    """L_hybrid's L_vlb (Nichol & Dhariwal 2021, sec. 3.1) per image, in bits per dimension: ``(B,)``.

    Estimated from the loss's own (t, x_t) as T times that timestep's term L_t (KL, or the decoder's NLL at
    t = 0: :func:`ddpm_jax.diffusion.likelihood.vlb_term`), as improved-diffusion does. It trains only the
    variance (``v``, ``(B, H, W, C)``): the mean is seen through a stop-gradient on ``eps_hat`` (their sec. 3.1,
    improved-diffusion's frozen_out), so it keeps L_simple's gradient alone; unclipped, as x_0 predictions are
    not clipped in training there.
    """
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps_hat), v], axis=-1)
    term_nats = vlb_term(schedule, x0, x_t, t, p_mean_variance(schedule, x_t, t, frozen, "learned", mean_type="eps"))
    return schedule.num_timesteps * term_nats / (x0[0].size * jnp.log(2.0))


def l_simple(
    schedule: DiffusionSchedule, eps_fn: EpsWithAuxFn, x0: jnp.ndarray, key: jax.Array, min_snr_gamma: float | None = None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, object]:
    """L_simple (Ho et al. 2020, eq. 14; the report's eq. 16) for one batch; returns the scalar loss.

    :func:`training_loss` of a network that predicts eps alone, ``eps_fn(x_t, t) -> (eps_hat, aux)``: draws
    ``t ~ Uniform{0..T-1}`` and ``eps ~ N(0, I)`` per image and scores ``||eps - eps_hat(x_t, t)||^2``, averaged
    over pixels. With ``min_snr_gamma`` each image's term is weighted by :func:`min_snr_weights` before the batch
    mean (the per-image losses returned stay the unweighted MSE, comparable across runs).

    Returns:
      ``(loss, per_image_loss (B,), t (B,), aux)``: the batch mean, each image's
      loss and timestep (for per-timestep logging), and ``eps_fn``'s aux.
    """
    return training_loss(schedule, eps_fn, x0, key, min_snr_gamma=min_snr_gamma)


def l_hybrid(
    schedule: DiffusionSchedule, model_fn: EpsWithAuxFn, x0: jnp.ndarray, key: jax.Array, vlb_weight: float = 0.001
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, object]:
    """L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1) for a learned-variance network.

    :func:`training_loss` with ``hybrid_lambda=vlb_weight`` (lambda, 0.001 in the paper). ``model_fn(x_t, t) ->
    (output, aux)`` with ``output`` ``(B, H, W, 2C)``: eps and v (:func:`ddpm_jax.diffusion.split_learned_variance`).
    L_simple trains eps as usual, L_vlb only the variance (:func:`hybrid_vlb_term`). Same return values as
    :func:`l_simple`.
    """
    return training_loss(schedule, model_fn, x0, key, hybrid_lambda=vlb_weight)
