"""``cifar10``: Ho et al.'s CIFAR-10 setup, a GPU run (Ho et al. report FID 3.17).

Their U-Net with 128 base channels, multipliers (1, 2, 2, 2), 2 residual blocks per level,
self-attention at 16x16 and in the middle, dropout 0.1, GroupNorm(32) (35,746,307 parameters); linear
schedule T=1000; Adam 2e-4 with 5,000 warm-up steps, batch 128, 800,000 steps, clipping at 1, EMA
0.9999, random flips; sampled with sigma_t^2 = beta_t. Dropout, clipping, EMA and the sampling
variance are the default's values.
"""

from __future__ import annotations

import ml_collections

from ddpm_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    """The ``cifar10`` preset's config (a fresh ``ConfigDict``)."""
    c = default.get_config()
    c.preset = "cifar10"
    c.dataset = "cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.native_size = 32
    c.data.random_flip = True
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.model.name = "ddpm_unet"
    c.model.base_channels = 128
    c.model.levels = 3
    c.model.channel_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (16,)
    c.model.norm_groups = 32
    c.model.output_head = "conv"
    c.train.batch_size = 128
    c.train.num_steps = 800_000
    c.train.sample_every = 80_000
    c.train.learning_rate = 2e-4
    c.train.lr_schedule = "constant"  # Ho et al.: constant after the warm-up
    c.train.warmup_steps = 5000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.sampling.grid_size = 8
    return c
