"""``cpu``: the default on a machine without a GPU, about 18 minutes of training on 2 CPU cores.

The ``quick`` network made class-conditional and trained 9,000 steps. ``sample()`` without labels
draws each digit from the training label frequencies and guides it (classifier-free, w = 0.5): the
sweep of ``python -m experiments.sweep`` found this the lever that buys the most quality per CPU
minute (docs/results.md, "Quality per CPU minute").
"""

from __future__ import annotations

import ml_collections

from ddpm_jax.configs.presets import quick


def get_config() -> ml_collections.ConfigDict:
    """The ``cpu`` preset's config (a fresh ``ConfigDict``)."""
    c = quick.get_config()
    c.preset = "cpu"
    c.model.num_classes = 10
    c.train.num_steps = 9000
    c.train.sample_every = 900
    # The sweep's lowest FID for this network: w = 0.5 (11.3 at 5,000 samples) against 34.3 at w = 1,
    # which over-sharpens a network trained this long (docs/results.md, "Quality per CPU minute").
    c.sampling.guidance_scale = 0.5
    return c
