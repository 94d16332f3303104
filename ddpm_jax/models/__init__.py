"""Denoising networks. They map ``(x, t)`` to an array of ``x``'s shape and know nothing of diffusion."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.models.ddpm_unet import DDPMUNet
from ddpm_jax.models.layers import CONV_IMPLS, Conv3x3, UpConv2x2
from ddpm_jax.models.unet import LabelEmbedding, ReportUNet, TimeConditionedBlock, sinusoidal_embedding

MODEL_NAMES: tuple[str, ...] = ("report_unet", "ddpm_unet")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def output_channels(model_config, image_channels: int = 1) -> int:
    """The network's output channels: eps, and v too for a learned variance (``model.learn_variance``)."""
    return image_channels * (2 if model_config.get("learn_variance", False) else 1)


def build_model(model_config) -> nn.Module:
    """The network a config's ``model`` section describes (``name`` plus its fields).

    ``conv_impl`` and ``compute_dtype`` default to ``'auto'`` and ``'float32'``
    for configs saved before they existed.
    """
    name = model_config.name
    conv_impl = model_config.get("conv_impl", "auto")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={conv_impl!r} is not one of: {', '.join(CONV_IMPLS)}.")
    compute_dtype = model_config.get("compute_dtype", "float32")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype={compute_dtype!r} is not one of: {', '.join(COMPUTE_DTYPES)}.")
    # What every network takes alike: its output channels and how it computes.
    common = {"out_channels": output_channels(model_config), "dtype": COMPUTE_DTYPES[compute_dtype],
              "conv_impl": conv_impl, "num_classes": int(model_config.get("num_classes", 0))}
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


__all__ = [
    "COMPUTE_DTYPES",
    "DDPMUNet",
    "LabelEmbedding",
    "CONV_IMPLS",
    "MODEL_NAMES",
    "Conv3x3",
    "ReportUNet",
    "TimeConditionedBlock",
    "UpConv2x2",
    "build_model",
    "output_channels",
    "sinusoidal_embedding",
]
