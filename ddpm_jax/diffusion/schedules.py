"""Noise schedules and the tables derived from them.

Timestep convention, stated once for the whole package: a timestep is a
0-based index ``i`` in ``0..T-1``, and index ``i`` is the paper's ``t = i + 1``
(Ho et al. 2020 number steps ``1..T``). So ``betas[i]`` is the paper's
``beta_{i+1}``, ``alpha_bars[i] = prod_{j<=i} (1 - betas[j])`` is
``abar_{i+1}``, ``alpha_bars_prev[0] = 1`` is ``abar_0``, and index ``0`` is the
last reverse step, the one that adds no noise.

Every table is computed once in float64 numpy (as improved-diffusion does) and
cast to float32 at the end, so nothing downstream recomputes or re-derives
them in lower precision.
"""

from __future__ import annotations

import math
from typing import Literal

import chex
import flax.struct
import jax.numpy as jnp
import numpy as np

ScheduleName = Literal["linear", "cosine"]
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "cosine")


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(
            f"num_timesteps must be an integer >= 1, got {num_timesteps!r}; "
            "the report uses T=100, Ho et al. T=1000."
        )


def _linear_betas64(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    _check_num_timesteps(num_timesteps)
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(
            f"linear schedule needs 0 < beta_start, beta_end < 1, got "
            f"beta_start={beta_start}, beta_end={beta_end} (Ho et al.: 1e-4 and 0.02)."
        )
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _cosine_betas64(num_timesteps: int, s: float, max_beta: float) -> np.ndarray:
    _check_num_timesteps(num_timesteps)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta} (Nichol & Dhariwal: 0.999).")
    if s < 0.0:
        raise ValueError(f"the cosine offset s must be >= 0, got {s} (Nichol & Dhariwal: 0.008).")
    # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0).
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    alpha_bars = f / f[0]
    # beta_i = 1 - abar(i+1) / abar(i), clipped so the last steps stay invertible.
    return np.minimum(1.0 - alpha_bars[1:] / alpha_bars[:-1], max_beta)


def linear_beta_schedule(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> jnp.ndarray:
    """Ho et al. 2020's linear schedule; returns ``betas`` of shape ``(T,)``, float32.

    The defaults are the paper's values for T=1000.
    """
    return jnp.asarray(_linear_betas64(num_timesteps, beta_start, beta_end), dtype=jnp.float32)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> jnp.ndarray:
    """Nichol & Dhariwal 2021's cosine schedule; returns ``betas`` of shape ``(T,)``, float32.

    ``abar(t) = f(t) / f(0)`` with ``f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)``,
    and ``beta_i = min(1 - abar(i+1) / abar(i), max_beta)`` for ``i = 0..T-1``.
    """
    return jnp.asarray(_cosine_betas64(num_timesteps, s, max_beta), dtype=jnp.float32)


def betas_for(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
    """float64 betas ``(T,)`` of the schedule called ``name`` (``'linear'`` or ``'cosine'``)."""
    if name == "linear":
        return _linear_betas64(num_timesteps, beta_start, beta_end)
    if name == "cosine":
        return _cosine_betas64(num_timesteps, cosine_s, max_beta)
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULE_NAMES)}.")


@flax.struct.dataclass
class DiffusionSchedule:
    """Every per-timestep table the forward process, the loss and the samplers use.

    All fields are float32 arrays of shape ``(T,)`` indexed by the 0-based
    timestep ``i`` (the paper's ``t = i + 1``; see the module docstring).
    Build it with :meth:`from_betas`; it is a pytree, so it can be passed into
    and closed over by jitted functions.
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray  # 1 - beta_t
    alpha_bars: jnp.ndarray  # abar_t = prod_{s<=t} alpha_s
    alpha_bars_prev: jnp.ndarray  # abar_{t-1}, with abar_0 = 1
    sqrt_alpha_bars: jnp.ndarray
    sqrt_one_minus_alpha_bars: jnp.ndarray
    # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta-tilde_t); Ho et al. eq. 6-7.
    posterior_variance: jnp.ndarray  # beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas) -> "DiffusionSchedule":
        """Derive all tables from ``betas`` of shape ``(T,)`` with values in (0, 1).

        ``betas`` may be any array-like; the derivation runs in float64.
        """
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must have shape (T,) with T >= 1, got shape {betas.shape}.")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0.0) or np.any(betas >= 1.0):
            bad = betas[~((betas > 0.0) & (betas < 1.0))]
            raise ValueError(
                f"every beta must lie in the open interval (0, 1); got {bad[:5]} "
                "(clip with max_beta, e.g. 0.999, and keep beta_start > 0)."
            )
        alphas = 1.0 - betas
        alpha_bars = np.cumprod(alphas)
        alpha_bars_prev = np.append(1.0, alpha_bars[:-1])
        posterior_variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
        # beta-tilde_0 is exactly 0 (x_0 is known given x_1 and x_0); clamp before the log
        # with the next value, as Ho et al.'s code does, so log-variances stay finite.
        floor = posterior_variance[1] if len(betas) > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.maximum(posterior_variance, floor))
        posterior_mean_coef1 = betas * np.sqrt(alpha_bars_prev) / (1.0 - alpha_bars)
        posterior_mean_coef2 = (1.0 - alpha_bars_prev) * np.sqrt(alphas) / (1.0 - alpha_bars)

        f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
        return cls(
            betas=f32(betas),
            alphas=f32(alphas),
            alpha_bars=f32(alpha_bars),
            alpha_bars_prev=f32(alpha_bars_prev),
            sqrt_alpha_bars=f32(np.sqrt(alpha_bars)),
            sqrt_one_minus_alpha_bars=f32(np.sqrt(1.0 - alpha_bars)),
            posterior_variance=f32(posterior_variance),
            posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
            posterior_mean_coef1=f32(posterior_mean_coef1),
            posterior_mean_coef2=f32(posterior_mean_coef2),
        )

    def check(self) -> None:
        """Assert every table has shape ``(T,)`` (chex)."""
        chex.assert_shape(
            [getattr(self, f) for f in self.__dataclass_fields__], (self.num_timesteps,)
        )


def extract(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Gather ``table[t]`` for a batch of timesteps and reshape to broadcast.

    Args:
      table: ``(T,)`` per-timestep values.
      t: int array ``(B,)`` of 0-based timesteps.
      ndim: rank of the array the result multiplies (4 for NHWC images).

    Returns:
      ``(B, 1, ..., 1)`` with ``ndim`` axes.
    """
    chex.assert_rank(t, 1)
    return table[t].reshape((t.shape[0],) + (1,) * (ndim - 1))


def space_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """``steps`` of the ``num_timesteps`` training timesteps, evenly spaced, ascending, int ``(steps,)``.

    As improved-diffusion's ``space_timesteps`` with one section: the first
    (0) and the last (T-1) are always kept, those between are rounded from an
    even stride; ``steps = T`` keeps every timestep and ``steps = 1`` keeps only
    T-1 (one jump from noise to the prediction of x_0).
    """
    _check_num_timesteps(num_timesteps)
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in 1..T={num_timesteps}, got {steps!r}.")
    if steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.arange(steps) * (num_timesteps - 1) / (steps - 1)).astype(np.int64)


def respace_betas(betas, timesteps) -> np.ndarray:
    """Betas of the process that visits only ``timesteps`` (Nichol & Dhariwal 2021, section 4).

    The respaced process keeps the marginals q(x_t | x_0) of the kept steps:
    ``abar'_k = abar[timesteps[k]]``, so ``beta'_k = 1 - abar'_k / abar'_{k-1}``
    (``abar'_{-1} = 1``). Computed in float64 from the float64 ``betas``: with
    every timestep kept, the result is ``betas`` to float64 rounding.
    """
    betas = np.asarray(betas, dtype=np.float64)
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1 or len(timesteps) < 1 or np.any(np.diff(timesteps) <= 0):
        raise ValueError(f"timesteps must be strictly increasing indices, got {timesteps}.")
    if timesteps[0] < 0 or timesteps[-1] >= len(betas):
        raise ValueError(f"timesteps must lie in 0..{len(betas) - 1}, got {timesteps}.")
    alpha_bars = np.cumprod(1.0 - betas)[timesteps]
    return 1.0 - alpha_bars / np.append(1.0, alpha_bars[:-1])


# Where the K steps of a few-step sampler fall among the T training timesteps (Lin et al. 2024, Table 2;
# diffusers' timestep_spacing). Every sampler evaluates the network at exactly these timesteps and ends
# with a step to clean data from the smallest of them.
SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing", "logsnr")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace", *, betas=None) -> np.ndarray:
    """``steps`` distinct training timesteps (0-based, ascending, int ``(steps,)``) chosen by ``spacing``:

    * ``'linspace'``: :func:`space_timesteps`, evenly spaced from 0 to T-1, both kept (improved-diffusion's
      respacing; diffusers' DDIM 'linspace'). T=100, K=10: 0, 11, 22, ..., 99.
    * ``'leading'``: ``k * (T // K)``, from 0 up, never reaching T-1 (diffusers' DDIM 'leading', Stable
      Diffusion's): 0, 10, 20, ..., 90. The first step starts from a noise level below the prior's.
    * ``'trailing'``: ``round(T - k T / K) - 1``, from T-1 down, never reaching 0 (Lin et al.'s fix:
      the first step starts at t = T, and no network call is spent at the smallest noise): 9, 19, ..., 99.
    * ``'logsnr'``: uniform in log-SNR ``lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t))`` from
      lambda_{T-1} to lambda_0 (DPM-Solver's spacing), each point rounded to the training timestep of
      nearest lambda, kept distinct; needs the schedule's float64 ``betas``.

    With ``steps = T`` every spacing keeps every timestep.
    """
    _check_num_timesteps(num_timesteps)
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in 1..T={num_timesteps}, got {steps!r}.")
    if spacing == "linspace":
        return space_timesteps(num_timesteps, steps)
    if spacing == "leading":
        return np.arange(steps, dtype=np.int64) * (num_timesteps // steps)
    if spacing == "trailing":
        return np.sort(np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1)[-steps:]
    if spacing == "logsnr":
        if betas is None or len(betas) != num_timesteps:
            raise ValueError("spacing='logsnr' needs the schedule's betas (T of them) to compute log-SNR.")
        alpha_bars = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        lambdas = 0.5 * (np.log(alpha_bars) - np.log1p(-alpha_bars))  # decreasing in t
        targets = np.linspace(lambdas[-1], lambdas[0], steps)
        chosen = np.sort(np.abs(lambdas[None, :] - targets[:, None]).argmin(axis=1))
        for k in range(1, steps):  # distinct: nudge collisions up, then back below T-1 from the top
            chosen[k] = max(chosen[k], chosen[k - 1] + 1)
        for k in range(steps - 1, -1, -1):
            chosen[k] = min(chosen[k], num_timesteps - steps + k)
        return chosen.astype(np.int64)
    raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}.")
