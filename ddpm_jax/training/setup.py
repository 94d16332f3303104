"""What a config's train state is built from: the diffusion model's learning-rate schedule, its optimizer,
and the fresh :class:`~ddpm_jax.training.state.TrainState` (initialized network, optimizer, step 0).

The config layer below builds the network and checks the fields; this module joins what it builds to the
train state, which :mod:`ddpm_jax.training.state` defines without reading a config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax.configs import build_model, model_input_shape
from ddpm_jax.training.state import TrainState, learning_rate_schedule, make_optimizer, new_train_state


def diffusion_learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The diffusion run's learning-rate schedule (``train.learning_rate``, ``warmup_steps``, ``lr_schedule``)."""
    t = config.train
    return learning_rate_schedule(t.learning_rate, t.warmup_steps, t.num_steps, t.lr_schedule)


def diffusion_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam on :func:`diffusion_learning_rate`, after ``train.grad_clip_norm`` clipping if set."""
    return make_optimizer(diffusion_learning_rate(config), grad_clip_norm=config.train.grad_clip_norm)


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array | None = None) -> TrainState:
    """Build the diffusion model a config describes; returns a fresh TrainState (initialized network, optimizer, step 0)."""
    model = build_model(config.model)
    key = jax.random.PRNGKey(config.seed) if key is None else key
    init_key, run_key = jax.random.split(key)
    variables = model.init(
        init_key, jnp.zeros(model_input_shape(config, 1)), jnp.zeros((1,), jnp.int32), train=False
    )
    t, m = config.train, config.model
    return new_train_state(
        variables, diffusion_optimizer(config), run_key, ema=True,
        apply_fn=model.apply,
        ema_decay=float(t.get("ema_decay", 0.9999)),
        ema_warmup=bool(t.get("ema_warmup", True)),
        hybrid_lambda=float(t.get("hybrid_lambda", 0.001)) if m.get("learn_variance", False) else None,
        num_classes=int(m.get("num_classes", 0)),
        p_uncond=float(t.get("p_uncond", 0.1)),
        min_snr_gamma=float(t.get("min_snr_gamma", 5.0)) if t.get("loss_weighting", "none") == "min_snr" else None,
    )
