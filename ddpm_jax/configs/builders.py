"""What a config builds: the network, its input shape, the diffusion schedule, the timesteps a sampler visits.

Each builder turns a config (or its ``model`` section) into an object once; the machinery above is handed
the object, not the config. Nothing here checks a field (:mod:`ddpm_jax.configs.checks` does) or builds a
train state (:mod:`ddpm_jax.training.setup` does).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.cpu.layers import CONV_IMPLS, layer_ops
from ddpm_jax.diffusion.schedules import DiffusionSchedule, betas_for, respace_betas, spaced_timesteps
from ddpm_jax.models import COMPUTE_DTYPES, MODEL_NAMES, DDPMUNet, ReportUNet

# The network.


def model_input_shape(config: ml_collections.ConfigDict, batch_size: int) -> tuple[int, int, int, int]:
    """NHWC shape of a batch the network of ``config`` takes: ``data.channels`` at ``data.image_size``
    (MNIST's 28x28 grey padded to it)."""
    size = config.data.image_size
    return (batch_size, size, size, int(config.data.get("channels", 1)))


def output_multiple(model_config) -> int:
    """Output channels per image channel: eps, and v too for a learned variance (``model.learn_variance``)."""
    return 2 if model_config.get("learn_variance", False) else 1


def build_model(model_config) -> nn.Module:
    """The network a config's ``model`` section describes (``name`` plus its fields).

    ``conv_impl`` and ``compute_dtype`` default to ``'auto'`` and ``'float32'``
    for configs saved before they existed; ``conv_impl`` names the ops the network's layers compute
    with (:func:`ddpm_jax.cpu.layers.layer_ops`, the one place that chooses them).
    """
    name = model_config.name
    conv_impl = model_config.get("conv_impl", "auto")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={conv_impl!r} is not one of: {', '.join(CONV_IMPLS)}.")
    compute_dtype = model_config.get("compute_dtype", "float32")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype={compute_dtype!r} is not one of: {', '.join(COMPUTE_DTYPES)}.")
    # What every network takes alike: its output channels and how it computes.
    common = {"output_multiple": output_multiple(model_config), "dtype": COMPUTE_DTYPES[compute_dtype],
              "ops": layer_ops(conv_impl), "num_classes": int(model_config.get("num_classes", 0))}
    if name == "report_unet":
        return ReportUNet(
            base_channels=model_config.base_channels,
            levels=model_config.levels,
            time_embed_dim=model_config.time_embed_dim,
            output_head=model_config.output_head,
            **common,
        )
    if name == "ddpm_unet":
        return DDPMUNet(
            base_channels=model_config.base_channels,
            channel_mult=tuple(model_config.channel_mult),
            num_res_blocks=model_config.num_res_blocks,
            attention_resolutions=tuple(model_config.attention_resolutions),
            dropout=model_config.dropout,
            num_heads=model_config.num_heads,
            groups=model_config.norm_groups,
            **common,
        )
    raise ValueError(f"model.name={name!r} is not one of: {', '.join(MODEL_NAMES)}.")


def variable_shapes(config: ml_collections.ConfigDict) -> dict:
    """Shapes of the variables (``{'params': ..., 'batch_stats': ...}``) of the network ``config.model``
    describes, as :func:`jax.eval_shape` of its init for inference; no arrays are created."""
    model = build_model(config.model)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(model_input_shape(config, 1)),
                                             jnp.zeros((1,), jnp.int32), train=False))


@functools.lru_cache(maxsize=16)
def expected_variables(config: ml_collections.FrozenConfigDict):
    """:func:`variable_shapes` of a (frozen, so hashable) config, kept for the configs checkpoints are loaded with."""
    return variable_shapes(config)


# The diffusion schedule and the timesteps a sampler visits.


def _betas(config: ml_collections.ConfigDict) -> np.ndarray:
    d = config.diffusion
    return betas_for(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                     cosine_s=d.cosine_s, max_beta=d.max_beta)


def schedule_from_config(config: ml_collections.ConfigDict, steps: int | None = None,
                         spacing: str = "linspace") -> DiffusionSchedule:
    """The :class:`DiffusionSchedule` a config's ``diffusion`` section describes.

    With ``steps = K`` (< T), the schedule respaced to K of the T timesteps
    (:func:`ddpm_jax.diffusion.schedules.respace_betas`) chosen by ``spacing``; its index k stands for
    the training timestep :func:`sampling_timesteps` ``(config, K, spacing)[k]``.
    """
    betas = _betas(config)
    if steps is not None and steps != config.diffusion.num_timesteps:
        betas = respace_betas(betas, sampling_timesteps(config, steps, spacing))
    return DiffusionSchedule.from_betas(betas)


def sampling_timesteps(config: ml_collections.ConfigDict, steps: int | None = None, spacing: str = "linspace"):
    """The training timesteps (0-based, ascending) a K-step sampler visits (:func:`ddpm_jax.diffusion.schedules.spaced_timesteps`
    by ``spacing``): all T when ``steps`` is None."""
    num_timesteps = config.diffusion.num_timesteps
    return spaced_timesteps(num_timesteps, steps or num_timesteps, spacing,
                            betas=_betas(config) if spacing == "logsnr" else None)


# How much of the data a run trains on, and how large its end-of-run figures are.


def num_training_images(config: ml_collections.ConfigDict, available: int) -> int:
    """How many of ``available`` images a run trains on: ``data.max_train_examples`` of them, or all (0)."""
    return min(available, config.data.max_train_examples or available)


def figure_grid_size(config: ml_collections.ConfigDict) -> int:
    """The side of the end-of-run sample grid: ``sampling.grid_size``, shrunk for a short run so that the grid's
    network evaluations (side^2 samples x T steps) stay within ``sampling.figure_share`` of the training's
    (``train.num_steps`` x ``train.batch_size`` images, each a forward and a backward pass, about 3 evaluations);
    never below 2 (or ``grid_size``, if smaller)."""
    s, t = config.sampling, config.train
    budget = float(s.get("figure_share", 0.1)) * 3 * int(t.num_steps) * int(t.batch_size)
    fits = int((budget / int(config.diffusion.num_timesteps)) ** 0.5)
    return max(min(int(s.grid_size), 2), min(int(s.grid_size), fits))
