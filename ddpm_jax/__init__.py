"""ddpm-jax: denoising diffusion probabilistic models (Ho et al. 2020) in JAX/Flax.

Notebook use::

    import jax, ddpm_jax
    params = ddpm_jax.load_checkpoint("runs/mnist")
    images = ddpm_jax.sample(params, jax.random.PRNGKey(0), 16)  # (16, 28, 28, 1) in [-1, 1]
    sevens = ddpm_jax.sample(params, jax.random.PRNGKey(1), 16, labels=7)  # a --class-conditional run

Importing the package changes nothing in the process: no environment variables, no allocator
settings, nothing of JAX patched. It does not even import JAX: each name below loads its module
on first use (PEP 562), so ``import ddpm_jax`` is instant and the process is as it was. The CPU
speed settings the command-line programs use are one opt-in call, :func:`ddpm_jax.cpu.configure`,
made before the first JAX computation.

Timesteps are 0-based indices ``0..T-1`` everywhere (index ``i`` is the
paper's ``t = i + 1``); see :mod:`ddpm_jax.diffusion.schedules`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the module that defines it, or (for a module itself) ("module", its path).
_SOURCES = {
    "DiffusionCheckpoint": "ddpm_jax.training.checkpoint",
    "DiffusionSchedule": "ddpm_jax.diffusion.schedules",
    "FEW_STEPS": "ddpm_jax.sampling.options",
    "FeatureNetwork": "ddpm_jax.evaluation.feature_network",
    "PRESETS": "ddpm_jax.configs",
    "ReportUNet": "ddpm_jax.models",
    "TrainState": "ddpm_jax.training.state",
    "cosine_beta_schedule": "ddpm_jax.diffusion.schedules",
    "cpu": ("module", "ddpm_jax.cpu"),
    "create_train_state": "ddpm_jax.training.setup",
    "feature_networks": "ddpm_jax.evaluation.shipped",
    "get_config": "ddpm_jax.configs",
    "l_simple": "ddpm_jax.diffusion.losses",
    "linear_beta_schedule": "ddpm_jax.diffusion.schedules",
    "load_checkpoint": "ddpm_jax.training.checkpoint",
    "load_noisy_classifier": "ddpm_jax.training.noisy_classifier",
    "load_or_train_feature_network": "ddpm_jax.evaluation.feature_network",
    "make_ancestral_sampler": "ddpm_jax.diffusion.samplers",
    "metrics": ("module", "ddpm_jax.evaluation.metrics"),
    "p_mean": "ddpm_jax.diffusion.process",
    "p_mean_variance": "ddpm_jax.diffusion.process",
    "p_variance": "ddpm_jax.diffusion.process",
    "predict_x0_from_eps": "ddpm_jax.diffusion.process",
    "prior_labels": "ddpm_jax.sampling.generate",
    "q_posterior_mean": "ddpm_jax.diffusion.process",
    "q_sample": "ddpm_jax.diffusion.process",
    "sample": "ddpm_jax.sampling.generate",
    "train_and_evaluate": "ddpm_jax.training.train",
    "train_step": "ddpm_jax.training.train",
    "write_figures": "ddpm_jax.evaluation.figures",
}
__all__ = sorted(_SOURCES)
__version__ = "0.1.0"


def __getattr__(name: str):
    """Load a public name's module on first use (PEP 562) and keep the name here."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")
    source = _SOURCES[name]
    if isinstance(source, tuple):  # the name is a module
        value = importlib.import_module(source[1])
    else:
        value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools and IDEs read; the same names as _SOURCES
    from ddpm_jax import cpu
    from ddpm_jax.configs import PRESETS, get_config
    from ddpm_jax.diffusion.losses import l_simple
    from ddpm_jax.diffusion.process import (
        p_mean,
        p_mean_variance,
        p_variance,
        predict_x0_from_eps,
        q_posterior_mean,
        q_sample,
    )
    from ddpm_jax.diffusion.samplers import make_ancestral_sampler
    from ddpm_jax.diffusion.schedules import DiffusionSchedule, cosine_beta_schedule, linear_beta_schedule
    from ddpm_jax.evaluation import metrics
    from ddpm_jax.evaluation.feature_network import FeatureNetwork, load_or_train_feature_network
    from ddpm_jax.evaluation.figures import write_figures
    from ddpm_jax.evaluation.shipped import feature_networks
    from ddpm_jax.models import ReportUNet
    from ddpm_jax.sampling.generate import prior_labels, sample
    from ddpm_jax.sampling.options import FEW_STEPS
    from ddpm_jax.training.checkpoint import DiffusionCheckpoint, load_checkpoint
    from ddpm_jax.training.noisy_classifier import load_noisy_classifier
    from ddpm_jax.training.setup import create_train_state
    from ddpm_jax.training.state import TrainState
    from ddpm_jax.training.train import train_and_evaluate, train_step
