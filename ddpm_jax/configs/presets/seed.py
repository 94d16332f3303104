"""``seed``: the report's setup, a GPU run (8 hours on the report's RTX 4070).

Its 12,552,848-parameter U-Net (32 base channels, 4 levels) on MNIST padded to 32x32, cosine
schedule with T=100, batch 1000, 2000 epochs.
"""

from __future__ import annotations

import ml_collections

from ddpm_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    """The ``seed`` preset's config (a fresh ``ConfigDict``)."""
    c = default.get_config()
    c.preset = "seed"
    c.data.image_size = 32
    c.model.base_channels = 32
    c.model.levels = 4
    c.train.batch_size = 1000
    # 2000 epochs of the 60,000 training images at batch 1000.
    c.train.num_steps = 2000 * 60
    c.train.sample_every = 12_000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 500
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    return c
