"""A noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The encoder half of a U-Net with a pooled head, as D&N's classifier is (the
downsampling trunk of their U-Net, with an attention pool at 8x8); here a
plain global average pool, which is enough at MNIST's size. Like the denoising networks it knows nothing
of diffusion: it maps ``(x, t)`` to logits, with ``t`` fed only through the
time embedding.

Normalization is GroupNorm, never BatchNorm: the network holds no mutable
state, so ``jax.grad`` of its log-probabilities with respect to ``x`` (what
guidance adds to the sampler's mean) is the same function in training and in
sampling, with no batch statistics leaking between the images of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.models.layers import PLAIN, Conv3x3, LayerOps
from ddpm_jax.models.unet import sinusoidal_embedding


class NoisyClassifierStage(nn.Module):
    """conv3x3-GroupNorm-SiLU, + Dense(embedding) per channel, conv3x3-GroupNorm-SiLU.

    ``x``: ``(B, H, W, C_in)``, ``emb``: ``(B, E)`` -> ``(B, H, W, features)``.
    """

    features: int
    groups: int = 8
    ops: LayerOps = PLAIN  # see ddpm_jax.models.layers; the parameters are the same whichever it is

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray) -> jnp.ndarray:
        # Named as nn.Conv would be, so parameter trees are nn.Conv's.
        h = Conv3x3(self.features, ops=self.ops, name="Conv_0")(x)
        h = nn.silu(nn.GroupNorm(num_groups=self.groups)(h))
        # The time shift is added after the first norm (as the report U-Net's blocks do), so no
        # normalization can subtract it before the second convolution mixes it into the features.
        h = h + nn.Dense(self.features)(emb)[:, None, None, :]
        h = Conv3x3(self.features, ops=self.ops, name="Conv_1")(h)
        return nn.silu(nn.GroupNorm(num_groups=self.groups)(h))


class NoisyClassifier(nn.Module):
    """Time-conditioned conv stages with 2x2 average pooling between them, global average pool, logits.

    The default widths (16, 32, 64; 108,074 parameters) keep guidance cheap, and 200 training
    steps reach the accuracy of widths 32, 64, 128 (the measurements are beside the classifier's
    config, :func:`ddpm_jax.training.noisy_classifier.noisy_classifier_config`).

    Attributes:
      stage_channels: width of each stage; ``len - 1`` poolings (28 -> 14 -> 7, 32 -> 16 -> 8 for three).
      time_embed_dim: width of the sinusoidal embedding of ``t``, even.
      num_classes: number of logits.
      groups: GroupNorm groups; must divide every stage's width.
      ops: what the 3x3 convolutions compute with (:class:`ddpm_jax.models.layers.LayerOps`); the same
        parameters and, to float32 rounding, the same outputs whichever it is.
    """

    stage_channels: Sequence[int] = (16, 32, 64)
    time_embed_dim: int = 32
    num_classes: int = 10
    groups: int = 8
    ops: LayerOps = PLAIN

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """Class logits of noisy images.

        Args:
          x: float ``(B, H, W, C)`` NHWC: x_t, i.e. data scaled to [-1, 1] and then noised
            (so not bounded); H and W divisible by ``2 ** (len(stage_channels) - 1)``.
          t: int ``(B,)`` 0-based diffusion timesteps x was noised to.

        Returns:
          float32 ``(B, num_classes)`` logits (unnormalized log-probabilities).
        """
        chex.assert_rank(x, 4)
        chex.assert_shape(t, (x.shape[0],))
        chex.assert_type(t, int)
        for c in self.stage_channels:
            if c % self.groups:
                raise ValueError(f"stage_channels={tuple(self.stage_channels)}: each must be divisible by groups={self.groups}.")
        factor = 2 ** (len(self.stage_channels) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"images of {x.shape[1]}x{x.shape[2]} cannot be pooled {len(self.stage_channels) - 1} times "
                f"(stage_channels={tuple(self.stage_channels)}): height and width must be divisible by {factor}."
            )
        batch = x.shape[0]
        emb = sinusoidal_embedding(t, self.time_embed_dim)
        emb = nn.Dense(4 * self.time_embed_dim)(emb)
        # One SiLU after the MLP, so every stage's projection sees a nonlinear feature of t (D&N's emb_layers).
        emb = nn.silu(nn.Dense(4 * self.time_embed_dim)(nn.silu(emb)))
        h = x.astype(jnp.float32)
        for i, channels in enumerate(self.stage_channels):
            if i:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
            h = NoisyClassifierStage(channels, self.groups, self.ops)(h, emb)
        h = jnp.mean(h, axis=(1, 2))
        # Not zero-initialized (unlike the denoisers' output layer): a zero head passes no gradient back
        # until it has grown, and on MNIST that held the accuracy at t < T/4 after 150 steps at 26% against 82%.
        logits = nn.Dense(self.num_classes)(h)
        chex.assert_shape(logits, (batch, self.num_classes))
        return logits.astype(jnp.float32)
