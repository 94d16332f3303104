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
paper's ``t = i + 1``); see :mod:`ddpm_jax.schedules`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the module that defines it (None: the name is that module).
_SOURCES = {
    "DiffusionCheckpoint": "ddpm_jax.checkpoint",
    "DiffusionSchedule": "ddpm_jax.schedules",
    "FeatureNetwork": "ddpm_jax.feature_network",
    "PRESETS": "ddpm_jax.configs",
    "ReportUNet": "ddpm_jax.models",
    "TrainState": "ddpm_jax.train_state",
    "cosine_beta_schedule": "ddpm_jax.schedules",
    "cpu": None,
    "create_train_state": "ddpm_jax.configs",
    "get_config": "ddpm_jax.configs",
    "l_simple": "ddpm_jax.losses",
    "linear_beta_schedule": "ddpm_jax.schedules",
    "load_checkpoint": "ddpm_jax.checkpoint",
    "load_noisy_classifier": "ddpm_jax.noisy_classifier",
    "load_or_train_feature_network": "ddpm_jax.feature_network",
    "make_ancestral_sampler": "ddpm_jax.sampling",
    "metrics": None,
    "p_mean": "ddpm_jax.diffusion",
    "p_mean_variance": "ddpm_jax.diffusion",
    "p_variance": "ddpm_jax.diffusion",
    "predict_x0_from_eps": "ddpm_jax.diffusion",
    "prior_labels": "ddpm_jax.generate",
    "q_posterior_mean": "ddpm_jax.diffusion",
    "q_sample": "ddpm_jax.diffusion",
    "sample": "ddpm_jax.generate",
    "train_and_evaluate": "ddpm_jax.train",
    "train_step": "ddpm_jax.train",
    "write_figures": "ddpm_jax.figures",
}
__all__ = sorted(_SOURCES)
__version__ = "0.1.0"


def __getattr__(name: str):
    """Load a public name's module on first use (PEP 562) and keep the name here."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")
    module = importlib.import_module(_SOURCES[name] or f"ddpm_jax.{name}")
    value = module if _SOURCES[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools and IDEs read; the same names as _SOURCES
    from ddpm_jax import cpu, metrics
    from ddpm_jax.checkpoint import DiffusionCheckpoint, load_checkpoint
    from ddpm_jax.configs import PRESETS, create_train_state, get_config
    from ddpm_jax.diffusion import p_mean, p_mean_variance, p_variance, predict_x0_from_eps, q_posterior_mean, q_sample
    from ddpm_jax.feature_network import FeatureNetwork, load_or_train_feature_network
    from ddpm_jax.figures import write_figures
    from ddpm_jax.generate import prior_labels, sample
    from ddpm_jax.losses import l_simple
    from ddpm_jax.models import ReportUNet
    from ddpm_jax.noisy_classifier import load_noisy_classifier
    from ddpm_jax.sampling import make_ancestral_sampler
    from ddpm_jax.schedules import DiffusionSchedule, cosine_beta_schedule, linear_beta_schedule
    from ddpm_jax.train import train_and_evaluate, train_step
    from ddpm_jax.train_state import TrainState
