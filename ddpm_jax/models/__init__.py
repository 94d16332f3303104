"""Denoising networks. They map ``(x, t)`` to an array of ``x``'s shape and know nothing of diffusion
or of configs: :func:`ddpm_jax.configs.build_model` builds one from a config's ``model`` section."""

from __future__ import annotations

import jax.numpy as jnp

from ddpm_jax.models.ddpm_unet import DDPMUNet
from ddpm_jax.models.layers import PLAIN, Conv3x3, LayerOps, UpConv2x2
from ddpm_jax.models.unet import LabelEmbedding, ReportUNet, TimeConditionedBlock, sinusoidal_embedding

MODEL_NAMES: tuple[str, ...] = ("report_unet", "ddpm_unet")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "COMPUTE_DTYPES",
    "DDPMUNet",
    "LabelEmbedding",
    "LayerOps",
    "MODEL_NAMES",
    "PLAIN",
    "Conv3x3",
    "ReportUNet",
    "TimeConditionedBlock",
    "UpConv2x2",
    "sinusoidal_embedding",
]
