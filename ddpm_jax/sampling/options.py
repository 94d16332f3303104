"""The sampling options of :func:`ddpm_jax.sample` and of the evaluation: each checked once, here, and
defaulted from the run's config, with one message that names the value and what is allowed.

(The config's own fields are checked by :func:`ddpm_jax.configs.validate_config`.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddpm_jax.configs import BATCHNORM_MODES, is_number
from ddpm_jax.diffusion.process import MEAN_TYPES, VARIANCE_TYPES
from ddpm_jax.diffusion.samplers import DPM_SOLVER_ORDERS, dpm_solver_orders
from ddpm_jax.diffusion.schedules import SPACINGS

# Ho et al.'s Algorithm 2 (respaced when K < T), Song et al.'s DDIM, Lu et al.'s DPM-Solver++ (multistep,
# data prediction) and its stochastic variant SDE-DPM-Solver++.
SAMPLING_METHODS = ("ancestral", "ddim", "dpm_solver++", "sde_dpm_solver++")
DPM_SOLVERS = ("dpm_solver++", "sde_dpm_solver++")
# What K < T network calls use when no method or spacing is named, and the fewest calls K of 5, 10, 15, 20, 25, 50
# that come within 15% of the FID and within 1 point of the unreadable rate of all T ancestral steps in both
# feature spaces on the default MNIST run at 10,000 samples, and on Fashion-MNIST (docs/results.md, "Few network
# calls"; 25 calls do at 5,000 samples but are 18% above at 10,000, 10 calls pass in one space only). All T steps
# stay Algorithm 2.
FEW_STEP_METHOD = "sde_dpm_solver++"
FEW_STEP_SPACING = "trailing"
FEW_STEPS = 50


DEFAULT_ORDER = 2  # DPM-Solver++'s order when none is asked for (the multistep solver of Lu et al. 2022)


def resolve_variance(config, variance: str | None) -> str:
    """The reverse variance a run samples (or is scored) with: ``variance``, checked, or its default.

    The default is the network's own Sigma for a learned-variance network (Nichol & Dhariwal
    2021), else ``sampling.variance``. ``'learned'`` is refused for a network that predicts eps only.
    """
    learned_model = bool(config.model.get("learn_variance", False))
    if variance == "learned" and not learned_model:
        raise ValueError("variance='learned' needs a network trained to output it (model.learn_variance); "
                         "this one predicts eps only: use 'beta' or 'beta_tilde'.")
    variance = variance or ("learned" if learned_model else config.sampling.variance)
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCE_TYPES)}.")
    return variance


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How a run is sampled, every field checked and defaulted from its config by :func:`sampling_options`.

    ``steps``: None for all T (the network's own timesteps), else the K < T of a respaced
    sampler, placed by ``spacing`` (:data:`ddpm_jax.diffusion.schedules.SPACINGS`; 'linspace' for all T).
    ``variance`` and ``mean``: the ancestral step's (None otherwise); ``eta``: DDIM's; ``order``:
    DPM-Solver++'s (None otherwise).
    """

    method: str
    steps: int | None
    eta: float
    variance: str | None
    mean: str | None
    batchnorm: str
    order: int | None = None
    spacing: str = "linspace"


def sampling_options(config, *, steps=None, method: str | None = None, eta=0.0, variance: str | None = None,
                     mean: str | None = None, batchnorm: str | None = None, order: int | None = None,
                     spacing: str | None = None) -> SamplingOptions:
    """Check the sampling options of a run with ``config``, and fill in its defaults (see :func:`ddpm_jax.sample`).

    ``method=None``: ancestral sampling over all T steps, or when ``variance``, ``mean`` or ``eta`` is given
    (they set ancestral sampling's and DDIM's step); with K < T steps otherwise :data:`FEW_STEP_METHOD`.
    ``spacing=None``: :data:`FEW_STEP_SPACING`. The defaulted solver's order is 2, or 1 for K < 3 steps.
    """
    num_timesteps = config.diffusion.num_timesteps
    if steps is not None and (isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer))
                              or not 1 <= steps <= num_timesteps):
        raise ValueError(f"steps must be an integer in 1..{num_timesteps} (the T this network was trained with), "
                         f"got {steps!r}.")
    if method is None:
        all_steps = steps in (None, num_timesteps)
        method = "ancestral" if all_steps or variance is not None or mean is not None or eta else FEW_STEP_METHOD
        if method in DPM_SOLVERS and order is None:  # the highest order up to 2 that K steps reach (1 for K < 3)
            order = max(dpm_solver_orders(int(steps), DEFAULT_ORDER))
    if spacing is None:
        spacing = FEW_STEP_SPACING
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SAMPLING_METHODS)}.")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}.")
    if method in DPM_SOLVERS:
        order = _check_order(method, DEFAULT_ORDER if order is None else order, steps or num_timesteps)
        if variance is not None or mean is not None or eta:
            raise ValueError(f"variance=, mean= and eta= choose ancestral sampling's and DDIM's step; {method} "
                             "takes order= (and clips its x_0 predictions to [-1, 1], as they do).")
    elif order is not None:
        raise ValueError(f"order={order!r} applies to method='dpm_solver++' or 'sde_dpm_solver++' only.")
    elif method == "ddim":
        if variance is not None or mean is not None:
            raise ValueError("variance= and mean= choose ancestral sampling's step; DDIM's step is set by eta= "
                             "(0: deterministic, 1: sigma^2 = beta-tilde).")
        # Numbers from numpy are numbers; NaN and Inf are not valid etas (they give all-NaN images).
        if not is_number(eta, 0.0):
            raise ValueError(f"eta must be a finite number >= 0 (0: deterministic, 1: ancestral), got {eta!r}.")
    elif eta:
        raise ValueError(f"eta={eta} applies to method='ddim' only.")
    else:
        variance = resolve_variance(config, variance)
        mean = mean or config.sampling.mean
        if mean not in MEAN_TYPES:
            raise ValueError(f"unknown mean {mean!r}; allowed: {', '.join(MEAN_TYPES)}.")
    batchnorm = batchnorm or config.sampling.get("batchnorm", "running")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm {batchnorm!r}; allowed: {', '.join(BATCHNORM_MODES)}.")
    steps = None if steps in (None, num_timesteps) else int(steps)
    return SamplingOptions(method=method, steps=steps, eta=float(eta), variance=variance, mean=mean,
                           batchnorm=batchnorm, order=order, spacing=spacing if steps else "linspace")


def _check_order(method: str, order, steps: int) -> int:
    """DPM-Solver++'s ``order``, if ``steps`` steps reach it (the first and the last step are first order)."""
    allowed = (1, 2) if method == "sde_dpm_solver++" else DPM_SOLVER_ORDERS
    if isinstance(order, (bool, np.bool_)) or order not in allowed:
        raise ValueError(f"order must be one of {', '.join(map(str, allowed))} for {method}, got {order!r}.")
    reached = max(dpm_solver_orders(steps, int(order)))
    if reached < order:
        least = next(k for k in range(1, 16) if max(dpm_solver_orders(k, int(order))) == order)
        raise ValueError(f"order={order} needs at least {least} steps: with {steps}, {method} never gets past order "
                         f"{reached} (its first step is first order, and so is its last, the step to clean data). "
                         f"Use order={reached} or steps >= {least}.")
    return int(order)
