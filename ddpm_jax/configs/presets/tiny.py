"""``tiny``: a few-second smoke test for tests and CI."""

from __future__ import annotations

import ml_collections

from ddpm_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    """The ``tiny`` preset's config (a fresh ``ConfigDict``)."""
    c = default.get_config()
    c.preset = "tiny"
    c.model.base_channels = 4
    c.model.levels = 1
    c.model.time_embed_dim = 8
    c.diffusion.num_timesteps = 10
    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.warmup_steps = 0
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.sample_every = 0
    c.sampling.batch_size = 16
    c.sampling.grid_size = 2
    c.sampling.strip_samples = 2
    c.sampling.strip_every = 5
    return c
