"""The Gaussian diffusion process: forward noising and the reverse step (:func:`p_mean_variance`).

Pure functions of a :class:`~ddpm_jax.diffusion.schedules.DiffusionSchedule`, arrays and
0-based timesteps (see :mod:`ddpm_jax.diffusion.schedules` for the convention). Images
are NHWC float arrays, data in [-1, 1]. Nothing here knows about networks.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import chex
import jax.numpy as jnp

from ddpm_jax.diffusion.schedules import DiffusionSchedule, extract

MeanType = Literal["x0_clip", "eps"]
MEAN_TYPES: tuple[str, ...] = ("x0_clip", "eps")
VarianceType = Literal["beta", "beta_tilde", "learned", "fixed_large"]
# Fixed reverse variances, the learned interpolation between them (Nichol & Dhariwal 2021), and 'beta' as
# Ho et al.'s code and improved-diffusion's FIXED_LARGE write it (see p_variance).
VARIANCE_TYPES: tuple[str, ...] = ("beta", "beta_tilde", "learned", "fixed_large")
FIXED_VARIANCE_TYPES: tuple[str, ...] = ("beta", "beta_tilde", "fixed_large")
# The network as the samplers and the bounds see it: eps_fn(variables, x_t, t) -> eps_hat (x_t's shape;
# 2C channels, eps and v, for a learned variance); t int (B,), 0-based.
EpsModelFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _check_batch(x: jnp.ndarray, t: jnp.ndarray) -> None:
    chex.assert_rank(x, 4)
    chex.assert_shape(t, (x.shape[0],))
    chex.assert_type(t, int)


def q_sample(schedule: DiffusionSchedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """Draw x_t ~ q(x_t | x_0) in closed form (Ho et al. 2020, eq. 4; report eq. 6); returns x_t shaped like ``x_0``.

    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``.

    Args:
      schedule: the diffusion tables.
      x0: clean images ``(B, H, W, C)`` in [-1, 1].
      t: int ``(B,)`` 0-based timesteps.
      noise: standard normal ``(B, H, W, C)``.

    Returns:
      ``x_t`` of shape ``(B, H, W, C)``.
    """
    _check_batch(x0, t)
    chex.assert_equal_shape([x0, noise])
    return (
        extract(schedule.sqrt_alpha_bars, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim) * noise
    )


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """Invert q_sample for x_0 given a noise estimate; returns ``(x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)``."""
    _check_batch(x_t, t)
    chex.assert_equal_shape([x_t, eps])
    return (x_t - extract(schedule.sqrt_one_minus_alpha_bars, t, x_t.ndim) * eps) / extract(
        schedule.sqrt_alpha_bars, t, x_t.ndim
    )


def q_posterior_mean(schedule: DiffusionSchedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Mean of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7); returns an array shaped like ``x_t``."""
    _check_batch(x_t, t)
    chex.assert_equal_shape([x0, x_t])
    return extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0 + extract(
        schedule.posterior_mean_coef2, t, x_t.ndim
    ) * x_t


def clip_x0(x0: jnp.ndarray) -> jnp.ndarray:
    """An x_0 (a prediction, or a finished sample) clipped to the data range [-1, 1]."""
    return jnp.clip(x0, -1.0, 1.0)


def eps_mean(schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """Ho et al. 2020, eq. 11 (Algorithm 2, line 4; the report's eq. 14): ``(x_t - beta_t / sqrt(1 - abar_t) eps) /
    sqrt(alpha_t)``, shaped like ``x_t``."""
    _check_batch(x_t, t)
    coef = extract(schedule.betas / schedule.sqrt_one_minus_alpha_bars, t, x_t.ndim)
    return (x_t - coef * eps) / jnp.sqrt(extract(schedule.alphas, t, x_t.ndim))


def clipped_x0_mean(schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """The reverse step's mean as Ho et al.'s released code computes it: the posterior mean of q(x_{t-1} | x_t, x_0)
    (eq. 7) at the x_0 that eps predicts, clipped to [-1, 1] (:func:`clip_x0`); shaped like ``x_t``. Without the
    clipping it is eq. 11 (:func:`eps_mean`)."""
    return q_posterior_mean(schedule, clip_x0(predict_x0_from_eps(schedule, x_t, t, eps)), x_t, t)


def p_mean(
    schedule: DiffusionSchedule,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    eps: jnp.ndarray,
    mean_type: MeanType = "x0_clip",
) -> jnp.ndarray:
    """Mean of the reverse step p(x_{t-1} | x_t) from the network's noise estimate; returns an array shaped like ``x_t``.

    ``'x0_clip'`` (default, as in Ho et al.'s released code: :func:`clipped_x0_mean`): predict x_0 from
    eps, clip it to [-1, 1], and take the posterior mean q(x_{t-1} | x_t, x_0).
    Clipping keeps early, poor eps estimates at large t from pushing samples
    out of the data range, the usual cause of samples that stay noise.

    ``'eps'``: the paper's Algorithm 2 line 4 / the report's eq. 14 literally (:func:`eps_mean`),
    ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)``. Without clipping
    both are the same function of eps.
    """
    if mean_type == "x0_clip":
        return clipped_x0_mean(schedule, x_t, t, eps)
    if mean_type == "eps":
        return eps_mean(schedule, x_t, t, eps)
    raise ValueError(f"unknown mean_type {mean_type!r}; allowed: {', '.join(MEAN_TYPES)}.")


def p_variance(schedule: DiffusionSchedule, variance_type: VarianceType, log: bool = False) -> jnp.ndarray:
    """The fixed reverse variances sigma_t^2; returns them (``log``: log sigma_t^2) with shape ``(T,)``.

    ``'beta'``: sigma_t^2 = beta_t (the upper bound on the reverse variance);
    ``'beta_tilde'``: sigma_t^2 = beta-tilde_t, the posterior variance (the lower bound),
    whose log is clipped at t = 0 (where beta-tilde is 0) as everywhere here.
    Ho et al. 2020, section 3.2, found both give similar samples. ``'fixed_large'``: 'beta' as Ho
    et al.'s released code (and improved-diffusion's ``FIXED_LARGE``) has it, beta_t except at the
    last step (index 0), which gets beta-tilde of index 1 "to get a better decoder log likelihood":
    it changes no sample (that step adds no noise), only the decoder term L_0 of the bound.
    """
    if variance_type == "beta":
        return jnp.log(schedule.betas) if log else schedule.betas
    if variance_type == "fixed_large":
        first = schedule.posterior_variance[1] if schedule.num_timesteps > 1 else schedule.betas[0]
        variances = schedule.betas.at[0].set(first)
        return jnp.log(variances) if log else variances
    if variance_type == "beta_tilde":
        return schedule.posterior_log_variance_clipped if log else schedule.posterior_variance
    if variance_type == "learned":
        raise ValueError("a learned variance comes from the network: use learned_log_variance(schedule, t, v).")
    raise ValueError(f"unknown variance_type {variance_type!r}; allowed: {', '.join(VARIANCE_TYPES)}.")


def split_learned_variance(output: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """A learned-variance network's output ``(B, H, W, 2C)`` -> ``(eps, v)``, each ``(B, H, W, C)``."""
    channels = output.shape[-1]
    if channels % 2:
        raise ValueError(f"a learned-variance network outputs eps and v, 2C channels; got {channels}.")
    return output[..., : channels // 2], output[..., channels // 2 :]


def learned_log_variance(schedule: DiffusionSchedule, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """log Sigma = f log beta_t + (1 - f) log beta-tilde_t with f = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15).

    ``v``: the network's second output, ``(B, H, W, C)``, one value per pixel; v = 1 gives
    beta_t (the upper bound on the reverse variance), v = -1 beta-tilde_t (the lower).
    As in their code, v in [-1, 1] spans the interval; unlike it, f is clipped to [0, 1],
    so Sigma never leaves the bounds (the gradient is 0 outside them, which pushes nothing).
    Log-variances: beta-tilde's clipped at t = 0 as everywhere here.
    """
    fraction = jnp.clip((v.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    log_beta = extract(jnp.log(schedule.betas), t, v.ndim)
    log_beta_tilde = extract(schedule.posterior_log_variance_clipped, t, v.ndim)
    return fraction * log_beta + (1.0 - fraction) * log_beta_tilde


def eps_and_sigma(
    schedule: DiffusionSchedule, t: jnp.ndarray, output: jnp.ndarray, variance_type: VarianceType
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The network's eps and the reverse step's sigma_t at ``t`` from its ``output``: ``(eps (B, H, W, C), sigma)``.

    sigma_t^2 is :func:`p_variance`'s beta_t (``'beta'``, ``'fixed_large'``) or beta-tilde_t (``'beta_tilde'``),
    ``(B, 1, 1, 1)``, with eps the whole output; or, ``'learned'``, :func:`learned_log_variance`'s per pixel
    ``(B, H, W, C)``, from an output of eps and v stacked ``(B, H, W, 2C)``. As :func:`p_mean_variance`'s ``std``.
    """
    if variance_type == "learned":
        eps, v = split_learned_variance(output)
        return eps, jnp.exp(0.5 * learned_log_variance(schedule, t, v))
    return output, extract(jnp.sqrt(p_variance(schedule, variance_type)), t, output.ndim)


class ReverseStep(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, exp(log_variance)) and the x_0 it predicts: each ``(B, H, W, C)``, except a
    fixed variance's ``log_variance`` and ``std``, ``(B, 1, 1, 1)``."""

    mean: jnp.ndarray
    log_variance: jnp.ndarray
    std: jnp.ndarray  # exp(log_variance / 2), as the sampler scales its noise
    pred_x0: jnp.ndarray  # clipped to [-1, 1] for the 'x0_clip' mean, as the mean uses it


def p_mean_variance(
    schedule: DiffusionSchedule,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    output: jnp.ndarray,
    variance_type: VarianceType = "beta",
    mean_type: MeanType = "x0_clip",
) -> ReverseStep:
    """The reverse step p(x_{t-1} | x_t) from the network's ``output`` at ``x_t``; returns a ReverseStep (mean, log-variance, std, x_0).

    The one place a network's output becomes a Gaussian, for every variance type, as
    improved-diffusion's ``p_mean_variance``: the ancestral sampler draws from it and the
    bound (:func:`ddpm_jax.diffusion.likelihood.vlb_terms`, ``l_hybrid``) scores it. ``output``: eps
    ``(B, H, W, C)`` for a fixed variance (``'beta'``, ``'beta_tilde'``: :func:`p_variance`),
    eps and v stacked ``(B, H, W, 2C)`` for ``'learned'`` (:func:`learned_log_variance`).
    ``mean_type`` as :func:`p_mean`.
    """
    _check_batch(x_t, t)
    if variance_type == "learned":
        eps, v = split_learned_variance(output)
        log_variance = learned_log_variance(schedule, t, v)
        std = jnp.exp(0.5 * log_variance)
    else:
        eps = output
        log_variance = extract(p_variance(schedule, variance_type, log=True), t, x_t.ndim)
        std = extract(jnp.sqrt(p_variance(schedule, variance_type)), t, x_t.ndim)
    chex.assert_equal_shape([eps, x_t])
    pred_x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    if mean_type == "x0_clip":
        pred_x0 = clip_x0(pred_x0)
    return ReverseStep(mean=p_mean(schedule, x_t, t, eps, mean_type), log_variance=log_variance, std=std,
                       pred_x0=pred_x0)
