"""Denoising networks. They map ``(x, t)`` to an array of ``x``'s shape and know nothing of diffusion."""

from __future__ import annotations

import flax.linen as nn

from ddpm_jax.models.unet import ReportUNet, TimeConditionedBlock, sinusoidal_embedding

MODEL_NAMES: tuple[str, ...] = ("report_unet",)


def build_model(model_config) -> nn.Module:
    """The network a config's ``model`` section describes (``name`` plus its fields)."""
    name = model_config.name
    if name == "report_unet":
        return ReportUNet(
            base_channels=model_config.base_channels,
            levels=model_config.levels,
            time_embed_dim=model_config.time_embed_dim,
            output_head=model_config.output_head,
        )
    raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_NAMES)}.")


__all__ = ["ReportUNet", "TimeConditionedBlock", "sinusoidal_embedding", "build_model", "MODEL_NAMES"]
