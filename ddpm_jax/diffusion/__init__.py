"""The diffusion math (Ho et al. 2020 and its successors) as pure functions of arrays and keys: schedules,
the forward process and the reverse step (``process``), the losses (Algorithm 1: ``losses``), the samplers
(Algorithm 2: ``ancestral``; ``ddim``; ``dpm_solver``; all three in ``samplers``, sharing ``chain``), the
likelihood bound and the guidance rules. Nothing here knows a network, a config or a file.

Timesteps are 0-based indices ``0..T-1`` everywhere (index ``i`` is the paper's ``t = i + 1``).

The forward process and reverse-step names (:mod:`ddpm_jax.diffusion.process`) are re-exported here."""

from __future__ import annotations

from ddpm_jax.diffusion.process import (  # noqa: F401
    FIXED_VARIANCE_TYPES,
    MEAN_TYPES,
    VARIANCE_TYPES,
    EpsModelFn,
    MeanType,
    ReverseStep,
    VarianceType,
    learned_log_variance,
    p_mean,
    p_mean_variance,
    p_variance,
    predict_x0_from_eps,
    q_posterior_mean,
    q_sample,
    split_learned_variance,
)

__all__ = ['EpsModelFn', 'FIXED_VARIANCE_TYPES', 'MEAN_TYPES', 'MeanType', 'ReverseStep', 'VARIANCE_TYPES', 'VarianceType', 'learned_log_variance', 'p_mean', 'p_mean_variance', 'p_variance', 'predict_x0_from_eps', 'q_posterior_mean', 'q_sample', 'split_learned_variance']
