"""The variational bound L_vlb (Ho et al. 2020, eq. 5) and negative log-likelihood in bits per dimension.

For an image x_0 (data in [-1, 1], 8-bit: 256 levels), with the 0-based
timesteps of :mod:`ddpm_jax.diffusion.schedules` (index i is the paper's t = i + 1):

    L_vlb = L_T + sum_{i=1}^{T-1} L_i + L_0
    L_T   = KL(q(x_T | x_0) || N(0, I))                      (the prior term; no network)
    L_i   = KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))    with x_i ~ q(x_i | x_0)
    L_0   = -log p(x_0 | x_1), p a Gaussian discretized to the 256 pixel bins (Ho et al. sec. 3.3)

all in nats per image; bits/dim divides by D ln 2, D the number of pixels the
network sees (28 x 28 = 784 for the cpu preset; 32 x 32 for the padded seed
preset, whose padding is part of its data space). Each term draws its own
x_i, so the sum is an unbiased single-sample estimate of the bound, as
improved-diffusion's ``calc_bpd_loop`` computes it. Everything here is a pure,
jit-able function of arrays; the network enters as ``eps_fn``.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from ddpm_jax.diffusion.process import EpsModelFn, ReverseStep, p_mean_variance, q_posterior_mean, q_sample
from ddpm_jax.diffusion.schedules import DiffusionSchedule, extract

# Half a pixel bin of 8-bit data mapped to [-1, 1].
_HALF_BIN = 1.0 / 255.0


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) under N(mean, exp(log_scale)^2) integrated over x's 8-bit bin, elementwise.

    ``x`` in [-1, 1] on the 256-level grid; the bins of -1 and 1 extend to -inf and +inf
    (Ho et al. sec. 3.3), so the 256 probabilities of a pixel sum to 1.
    """
    chex.assert_equal_shape([x, mean])
    inv_scale = jnp.exp(-log_scale)
    upper = (x - mean + _HALF_BIN) * inv_scale
    lower = (x - mean - _HALF_BIN) * inv_scale
    log_cdf_upper = log_ndtr(upper)  # the bin of -1: everything below its upper edge
    log_survival_lower = log_ndtr(-lower)  # the bin of 1: everything above its lower edge
    log_mass = jnp.log(jnp.maximum(ndtr(upper) - ndtr(lower), 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_survival_lower, log_mass))


def prior_kl(schedule: DiffusionSchedule, x0: jnp.ndarray) -> jnp.ndarray:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image, in nats: ``(B,)``."""
    last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    mean = extract(schedule.sqrt_alpha_bars, last, x0.ndim) * x0
    logvar = jnp.log(extract(1.0 - schedule.alpha_bars, last, x0.ndim))
    return jnp.sum(normal_kl(mean, logvar, 0.0, 0.0), axis=(1, 2, 3))


def vlb_term(schedule: DiffusionSchedule, x0, x_t, t, reverse: ReverseStep):
    """L_t for each image at its own timestep ``t`` ``(B,)``, in nats: ``(B,)``.

    ``t > 0``: KL of the true posterior q(x_{t-1} | x_t, x_0) from the model's reverse step
    p(x_{t-1} | x_t) = N(reverse.mean, exp(reverse.log_variance)) (:func:`ddpm_jax.diffusion.p_mean_variance`);
    ``t = 0``: the decoder's negative log-likelihood of ``x0``. ``x0``, ``x_t``: ``(B, H, W, C)``.
    """
    chex.assert_equal_shape([x0, x_t, reverse.mean])
    true_mean = q_posterior_mean(schedule, x0, x_t, t)
    true_logvar = extract(schedule.posterior_log_variance_clipped, t, x0.ndim)
    kl = jnp.sum(normal_kl(true_mean, true_logvar, reverse.mean, reverse.log_variance), axis=(1, 2, 3))
    decoder_nll = -jnp.sum(discretized_gaussian_log_likelihood(x0, reverse.mean, 0.5 * reverse.log_variance),
                           axis=(1, 2, 3))
    return jnp.where(t == 0, decoder_nll, kl)


def vlb_terms(
    eps_fn: EpsModelFn,
    schedule: DiffusionSchedule,
    variables,
    x0: jnp.ndarray,
    key: jax.Array,
    *,
    variance: str = "beta",
    mean_type: str = "x0_clip",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Every term of L_vlb for a batch: ``(terms (B, T), prior (B,))`` in nats.

    ``terms[:, i]`` is L_i (``i = 0``: the decoder term), each from its own
    x_i ~ q(x_i | x_0) (noise from ``fold_in(key, i)``); ``prior`` is L_T.
    One network call per timestep, inside one ``lax.scan``. ``variance``: ``'beta'``,
    ``'beta_tilde'``, or ``'learned'`` for a network whose output stacks eps and v.
    """
    chex.assert_rank(x0, 4)

    def term(_, i):
        t = jnp.full((x0.shape[0],), i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, x0.dtype)
        x_t = q_sample(schedule, x0, t, noise)
        reverse = p_mean_variance(schedule, x_t, t, eps_fn(variables, x_t, t), variance, mean_type)
        return None, vlb_term(schedule, x0, x_t, t, reverse)

    _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps))
    return terms.T, prior_kl(schedule, x0)


def bits_per_dim(terms: jnp.ndarray, prior: jnp.ndarray, num_dims: int) -> jnp.ndarray:
    """``(B,)`` negative log-likelihood bound in bits per dimension from :func:`vlb_terms`' output."""
    return (jnp.sum(terms, axis=-1) + prior) / (num_dims * math.log(2.0))
