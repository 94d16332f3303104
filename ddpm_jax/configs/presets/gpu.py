"""``gpu``: the default where JAX sees a GPU, about 2 minutes of training on one H200.

The report's U-Net (32x32, 32 base channels, 4 levels; the ``seed`` preset's) made class-conditional
with a zero-initialized convolutional head, trained 5,000 steps at batch 1000 (5M images, at the
~40,000 images/s measured for this network on one H200), sampled with classifier-free guidance at the
default's w = 1. ``python -m benchmarks.gpu_check`` trains and measures it (docs/gpu.md).
"""

from __future__ import annotations

import ml_collections

from ddpm_jax.configs.presets import seed


def get_config() -> ml_collections.ConfigDict:
    """The ``gpu`` preset's config (a fresh ``ConfigDict``)."""
    c = seed.get_config()
    c.preset = "gpu"
    # The report's network with what the CPU sweep found to buy quality per minute (class-conditional,
    # guided, a convolutional head), trained on 5M images (docs/gpu.md).
    c.model.output_head = "conv"
    c.model.num_classes = 10
    c.train.num_steps = 5000
    c.train.sample_every = 500
    c.train.checkpoint_every = 1000
    c.sampling.batch_size = 1000
    return c
