"""ddpm-jax: denoising diffusion probabilistic models (Ho et al. 2020) in JAX/Flax.

Notebook use::

    import jax, ddpm_jax
    params = ddpm_jax.load_checkpoint("runs/mnist")
    images = ddpm_jax.sample(params, jax.random.PRNGKey(0), 16)  # (16, 28, 28, 1) in [-1, 1]
    sevens = ddpm_jax.sample(params, jax.random.PRNGKey(1), 16, labels=7)  # a --class-conditional run

Timesteps are 0-based indices ``0..T-1`` everywhere (index ``i`` is the
paper's ``t = i + 1``); see :mod:`ddpm_jax.schedules`.
"""

from ddpm_jax import xla_cpu

xla_cpu.apply_cpu_flags()  # before any device is used; see ddpm_jax/xla_cpu.py
xla_cpu.keep_freed_memory()  # before XLA's threads first allocate; the same module says why
xla_cpu.unroll_threefry_on_cpu()  # before any random draw is compiled; likewise

from ddpm_jax import metrics  # noqa: E402
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

__all__ = [
    "DiffusionCheckpoint",
    "DiffusionSchedule",
    "FeatureNetwork",
    "PRESETS",
    "ReportUNet",
    "TrainState",
    "cosine_beta_schedule",
    "create_train_state",
    "get_config",
    "l_simple",
    "linear_beta_schedule",
    "load_checkpoint",
    "load_noisy_classifier",
    "load_or_train_feature_network",
    "make_ancestral_sampler",
    "metrics",
    "p_mean",
    "p_mean_variance",
    "p_variance",
    "predict_x0_from_eps",
    "prior_labels",
    "q_posterior_mean",
    "q_sample",
    "sample",
    "train_and_evaluate",
    "train_step",
    "write_figures",
]
