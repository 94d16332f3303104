"""Ho et al.'s (2020) DDPM U-Net, as improved-diffusion writes it, at MNIST size.

Residual blocks (GroupNorm, SiLU, 3x3 convolution; the time embedding added in
every block; dropout before the second convolution, which starts at zero so each
block starts as the identity), self-attention at the low resolutions (the
report's "only thing I didn't try"), strided-convolution downsampling and
nearest-neighbour upsampling followed by a convolution (XLA's transposed
convolutions are slow), skip connections from every block of the encoder.
The time embedding is the sinusoidal one of the report's U-Net through a
two-layer MLP (width 4 x base channels).

Like the report's U-Net it knows nothing of diffusion: ``(x, t) -> (B, H, W, out)``;
with ``num_classes > 0`` it also takes labels ``y``, embedded and added to the
time embedding after its MLP (as improved-diffusion's ``label_emb``).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.models.layers import PLAIN, Conv3x3, LayerOps
from ddpm_jax.models.unet import LabelEmbedding, check_labels_fit, sinusoidal_embedding


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv, + Dense(SiLU(embedding)), GroupNorm-SiLU-dropout-conv (zero-initialized), + skip.

    ``x`` ``(B, H, W, C_in)``, ``emb`` ``(B, E)`` -> ``(B, H, W, features)``; the skip is a
    1x1 convolution where the channel count changes.
    """

    features: int
    dropout: float = 0.1
    groups: int = 8
    dtype: Any = jnp.float32
    ops: LayerOps = PLAIN

    @nn.compact
    def __call__(self, x, emb, train: bool):
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype)(x))
        h = Conv3x3(self.features, ops=self.ops, dtype=self.dtype)(h)
        h = h + nn.Dense(self.features, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv3x3(self.features, ops=self.ops, kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
        skip = x if x.shape[-1] == self.features else nn.Dense(self.features, dtype=self.dtype, name="skip")(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, pre-GroupNorm, output projection zero-initialized, + x."""

    num_heads: int = 1
    groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention over {c} channels cannot split into {self.num_heads} heads.")
        tokens = nn.GroupNorm(self.groups, dtype=self.dtype)(x).reshape(b, h * w, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(tokens).reshape(b, h * w, 3, self.num_heads, -1)
        out = nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dtype=self.dtype)
        out = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj")(out.reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class DDPMUNet(nn.Module):
    """The DDPM U-Net (see the module docstring).

    Attributes:
      base_channels: channels at full resolution; level ``i`` has ``base * channel_mult[i]``.
      channel_mult: one multiplier per resolution; ``len - 1`` downsamplings, so height and
        width must be divisible by ``2 ** (len(channel_mult) - 1)``.
      num_res_blocks: residual blocks per resolution in the encoder (one more in the decoder).
      attention_resolutions: feature-map sizes (height) at which blocks are followed by self-attention.
      dropout: rate inside every residual block (training only; needs a ``'dropout'`` rng).
      out_channels: output channels; ``None`` means ``output_multiple`` times the input's.
      output_multiple: output channels per input channel when ``out_channels`` is None (2 for a
        network that also predicts a learned variance beside eps).
      ops: what its 3x3 convolutions compute with (:class:`ddpm_jax.models.layers.LayerOps`): the same
        parameters and, to float32 rounding, the same outputs whichever it is.
      num_classes: 0 (unconditional) or the number of classes of the labels ``y`` it takes
        (:class:`ddpm_jax.models.unet.LabelEmbedding`; ``y=None`` is the null label).
    """

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (14, 7)
    dropout: float = 0.1
    num_heads: int = 1
    groups: int = 8
    out_channels: int | None = None
    output_multiple: int = 1
    dtype: Any = jnp.float32
    ops: LayerOps = PLAIN
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        chex.assert_rank(x, 4)
        chex.assert_shape(t, (x.shape[0],))
        check_labels_fit(y, self.num_classes, "DDPMUNet")
        batch, height, width, channels = x.shape
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(f"DDPMUNet with channel_mult={self.channel_mult} needs height and width divisible "
                             f"by {factor}, got {height}x{width}.")
        emb_dim = 4 * self.base_channels
        emb = sinusoidal_embedding(t, self.base_channels).astype(self.dtype)
        emb = nn.Dense(emb_dim, dtype=self.dtype)(nn.silu(nn.Dense(emb_dim, dtype=self.dtype)(emb)))
        if self.num_classes:
            emb = emb + LabelEmbedding(self.num_classes, emb_dim, self.dtype, name="label_embedding")(y, batch)
        block = lambda features: ResidualBlock(features, self.dropout, self.groups, self.dtype, self.ops)  # noqa: E731
        attention = lambda: AttentionBlock(self.num_heads, self.groups, self.dtype)  # noqa: E731

        h = Conv3x3(self.base_channels, ops=self.ops, dtype=self.dtype)(x.astype(self.dtype))
        skips, size = [h], height
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = block(self.base_channels * mult)(h, emb, train)
                if size in self.attention_resolutions:
                    h = attention()(h)
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype)(h)
                skips.append(h)
                size //= 2
        h = block(h.shape[-1])(h, emb, train)
        h = attention()(h)
        h = block(h.shape[-1])(h, emb, train)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = block(self.base_channels * mult)(jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
                if size in self.attention_resolutions:
                    h = attention()(h)
            if level > 0:
                b, hh, ww, c = h.shape
                h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, hh, 2, ww, 2, c)).reshape(b, 2 * hh, 2 * ww, c)
                h = Conv3x3(c, ops=self.ops, dtype=self.dtype)(h)
                size *= 2
        out_channels = self.out_channels or channels * self.output_multiple
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype)(h))
        out = Conv3x3(out_channels, ops=self.ops, kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
        chex.assert_shape(out, (batch, height, width, out_channels))
        return out.astype(jnp.float32)
