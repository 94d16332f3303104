"""The report's U-Net: Ronneberger et al.'s U-Net with a per-block time embedding.

Read from the report's section 3.1 (Allard, "Implementing a Denoising Diffusion
Probabilistic Model"): 4 skip levels, 2x2 max-pooling down, 2x2 stride-2
transposed convolutions up, two conv + BatchNorm + LeakyReLU per block, 32
base channels doubling per level, and a 32-dim sinusoidal time embedding that
each block passes through its own dense layer and adds to every channel.

The reading that gives exactly the report's 12,552,848 parameters:

* block(C_in -> C): conv3x3(C_in -> C, bias) -> BatchNorm -> LeakyReLU
  -> + Dense(32 -> C)(embedding) per channel -> conv3x3(C -> C, bias)
  -> BatchNorm -> LeakyReLU;
* encoder blocks 1->32->64->128->256->512 with a 2x2 max-pool between
  them (the outputs of the first four are the skips), then one more 512->512
  block as the bottleneck;
* decoder steps of ConvTranspose(C -> C/2, kernel 2, stride 2), concatenation
  with the skip (back to C channels) and block(C -> C/2), down to 32 channels;
* a final block 32 -> 1 whose last LeakyReLU is left out, so eps can be negative
  (32 -> 3 for RGB images: the output has the input's channels).

The network knows nothing about diffusion: it maps ``(x, t)`` to an array of
``x``'s shape, with ``t`` fed only through the embedding. A class-conditional
network (``num_classes > 0``, not in the report) also takes a label ``y`` whose
learned embedding is added to the time embedding (:class:`LabelEmbedding`).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.models.layers import (
    PLAIN,
    BatchNorm,
    Conv3x3,
    LayerOps,
    UpConv2x2,
    add_per_example_channel_bias,
    max_pool_2x2,
)


def sinusoidal_embedding(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
    """Transformer-style sinusoidal embedding of timesteps (Vaswani et al. 2017, sec. 3.5).

    Args:
      t: ``(B,)`` timesteps (int or float).
      dim: embedding width, even.

    Returns:
      ``(B, dim)`` float32: ``[sin(t * f_k), cos(t * f_k)]`` with
      ``f_k = max_period^(-k / (dim/2))``, ``k = 0..dim/2-1``.
    """
    chex.assert_rank(t, 1)
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class LabelEmbedding(nn.Module):
    """A learned embedding of class labels, for adding to a time embedding.

    ``num_classes + 1`` rows: labels ``0..num_classes-1`` and the null label
    ``num_classes`` ("no label", what classifier-free guidance's unconditional
    prediction sees). ``y=None`` means the null label for the whole batch.
    ``y``: int ``(B,)`` -> ``(B, features)``.
    """

    num_classes: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jnp.ndarray | None, batch: int) -> jnp.ndarray:
        if y is None:
            y = jnp.full((batch,), self.num_classes, dtype=jnp.int32)
        chex.assert_shape(y, (batch,))
        return nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype, name="embedding")(y)


def check_labels_fit(y, num_classes: int, network: str) -> None:
    """A network built without classes refuses labels, rather than silently ignoring them."""
    if y is not None and not num_classes:
        raise ValueError(f"this {network} was built without classes (model.num_classes=0), so it takes no labels; "
                         "train a class-conditional one with --set model.num_classes=10.")


class TimeConditionedBlock(nn.Module):
    """conv-BN-LeakyReLU, + Dense(embedding) per channel, conv-BN[-LeakyReLU].

    ``x``: ``(B, H, W, C_in)``, ``emb``: ``(B, E)`` -> ``(B, H, W, features)``.
    """

    features: int
    final_activation: bool = True
    negative_slope: float = 0.01  # PyTorch's nn.LeakyReLU default
    bn_momentum: float = 0.9  # PyTorch's BatchNorm momentum=0.1, in Flax's convention
    dtype: Any = jnp.float32
    ops: LayerOps = PLAIN  # what the layers compute with (ddpm_jax.models.layers)

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, train: bool) -> jnp.ndarray:
        norm = lambda: BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype, ops=self.ops,
        )
        # Named as nn.Conv would be, so parameter trees are nn.Conv's.
        h = Conv3x3(self.features, ops=self.ops, dtype=self.dtype, name="Conv_0")(x)
        h = nn.leaky_relu(norm()(h), self.negative_slope)
        h = add_per_example_channel_bias(h, nn.Dense(self.features, dtype=self.dtype)(emb), self.ops)
        h = Conv3x3(self.features, ops=self.ops, dtype=self.dtype, name="Conv_1")(h)
        h = norm()(h)
        return nn.leaky_relu(h, self.negative_slope) if self.final_activation else h


class ReportUNet(nn.Module):
    """The report's U-Net (see the module docstring), configurable.

    Attributes:
      base_channels: channels of the first block; doubled at every level.
      levels: number of 2x2 max-poolings (= skip connections); height and width
        must be divisible by ``2**levels``.
      time_embed_dim: width of the sinusoidal embedding fed to every block.
      out_channels: channels of the output; ``None`` means ``output_multiple`` times the input's
        (1 or 3 for grey or RGB images; 2x for a network that also predicts a learned variance).
      output_head: ``'block'`` is the report's final block (32 -> 1 through a
        one-channel conv-BN-LeakyReLU, no last activation); ``'conv'`` replaces
        it by one zero-initialized 3x3 convolution from the last features (as
        Ho et al.'s U-Net ends), which avoids the report's one-channel
        bottleneck in front of the output.
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters
        stay float32 and the output is float32.
      ops: what the convolutions, BatchNorms, pooling and bias adds compute with
        (:class:`ddpm_jax.models.layers.LayerOps`): the same parameters and, to float32 rounding,
        the same outputs whichever it is.
      num_classes: 0 for an unconditional network; otherwise labels ``y`` in
        ``0..num_classes-1`` (or the null label ``num_classes``) are embedded and
        added to the time embedding every block sees.

    Call: ``x`` ``(B, H, W, C)`` float (data in [-1, 1], NHWC), ``t`` int ``(B,)``
    0-based timesteps, ``y`` int ``(B,)`` labels or None (the null label),
    ``train`` (BatchNorm uses batch statistics and updates
    ``batch_stats`` when True, running averages when False) -> ``(B, H, W, out)``.
    """

    base_channels: int = 32
    levels: int = 4
    time_embed_dim: int = 32
    out_channels: int | None = None
    output_multiple: int = 1
    output_head: str = "block"
    dtype: Any = jnp.float32
    ops: LayerOps = PLAIN
    num_classes: int = 0

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None,
                 train: bool = False) -> jnp.ndarray:
        chex.assert_rank(x, 4)
        chex.assert_shape(t, (x.shape[0],))
        check_labels_fit(y, self.num_classes, "ReportUNet")
        batch, height, width, channels = x.shape
        factor = 2**self.levels
        if height % factor or width % factor:
            raise ValueError(
                f"ReportUNet with levels={self.levels} needs height and width divisible by {factor}, "
                f"got {height}x{width}; pad the images (MNIST 28x28 -> 32x32 for 4 levels) or use fewer levels."
            )
        block = lambda features, **kw: TimeConditionedBlock(  # noqa: E731
            features, dtype=self.dtype, ops=self.ops, **kw
        )
        emb = sinusoidal_embedding(t, self.time_embed_dim)
        if self.num_classes:
            emb = emb + LabelEmbedding(self.num_classes, self.time_embed_dim, name="label_embedding")(y, batch)

        h = x.astype(self.dtype)
        skips = []
        for level in range(self.levels):
            h = block(self.base_channels * 2**level)(h, emb, train)
            skips.append(h)
            h = max_pool_2x2(h, self.ops)
        deepest = self.base_channels * 2**self.levels
        h = block(deepest)(h, emb, train)
        h = block(deepest)(h, emb, train)  # the bottleneck
        for i, level in enumerate(reversed(range(self.levels))):
            features = self.base_channels * 2**level
            h = UpConv2x2(features, ops=self.ops, dtype=self.dtype, name=f"ConvTranspose_{i}")(h)
            h = jnp.concatenate([h, skips[level]], axis=-1)
            h = block(features)(h, emb, train)
        out_channels = self.out_channels or channels * self.output_multiple
        if self.output_head == "block":
            out = block(out_channels, final_activation=False)(h, emb, train)
        elif self.output_head == "conv":
            out = Conv3x3(out_channels, ops=self.ops, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                          name="Conv_0")(h)
        else:
            raise ValueError(f"unknown output_head {self.output_head!r}; allowed: block, conv.")
        chex.assert_shape(out, (batch, height, width, out_channels))
        return out.astype(jnp.float32)
