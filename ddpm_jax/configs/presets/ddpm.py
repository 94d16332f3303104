"""``ddpm``: the ``quick`` preset's data, schedule and training with Ho et al.'s U-Net in place of the report's.

Residual blocks, GroupNorm, self-attention at 7x7 and dropout 0.1, at the default's widths: 16 base
channels, multipliers (1, 2, 2) (2 levels).
"""

from __future__ import annotations

import ml_collections

from ddpm_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    """The ``ddpm`` preset's config (a fresh ``ConfigDict``)."""
    c = default.get_config()
    c.preset = "ddpm"
    c.model.name = "ddpm_unet"
    c.model.num_res_blocks = 1
    return c
