"""The classifiers whose penultimate activations are the feature space for FID.

They play the role the Inception network plays for FID on natural images: a
fixed network trained once on the real training set; generated and real images
are compared through its features, and its labels give the class histogram.
:class:`MNISTClassifier` for 28x28 grey images (MNIST, Fashion-MNIST),
:class:`ResNetClassifier` for RGB ones (CIFAR-10, folders of RGB images).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp


class MNISTClassifier(nn.Module):
    """Two conv-conv-pool stages, a dense feature layer, then the class logits.

    Input: float32 ``(B, 28, 28, 1)`` in [-1, 1] (NHWC). Returns ``(logits,
    features)``: logits ``(B, num_classes)`` and the post-ReLU feature layer
    ``(B, feature_dim)``, the activations FID is computed in.
    """

    stage_channels: Sequence[int] = (32, 64)
    feature_dim: int = 128
    num_classes: int = 10
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        chex.assert_rank(x, 4)
        batch = x.shape[0]
        for channels in self.stage_channels:
            x = nn.relu(nn.Conv(channels, (3, 3))(x))
            x = nn.relu(nn.Conv(channels, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape((batch, -1))))
        logits = nn.Dense(self.num_classes)(nn.Dropout(self.dropout_rate, deterministic=not train)(features))
        chex.assert_shape([logits, features], [(batch, self.num_classes), (batch, self.feature_dim)])
        return logits, features


class ResidualStage(nn.Module):
    """Two 3x3 convolutions with GroupNorm and ReLU, added to the input (a 1x1 projection where the width or
    the stride changes): He et al.'s basic block, ``(B, H, W, C) -> (B, H/stride, W/stride, channels)``."""

    channels: int
    stride: int = 1
    groups: int = 8

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.relu(nn.GroupNorm(min(self.groups, x.shape[-1]))(x))
        skip = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            skip = nn.Conv(self.channels, (1, 1), strides=(self.stride, self.stride), name="project")(h)
        h = nn.Conv(self.channels, (3, 3), strides=(self.stride, self.stride))(h)
        h = nn.relu(nn.GroupNorm(self.groups)(h))
        h = nn.Conv(self.channels, (3, 3))(h)
        return skip + h


class ResNetClassifier(nn.Module):
    """A small pre-activation ResNet for 32x32 RGB images (CIFAR-10), the feature network's role there.

    A 3x3 stem, one residual block per entry of ``stage_channels`` (stride 2 from the second on),
    global average pooling, a dense feature layer and the class logits. GroupNorm, not BatchNorm,
    so the classifier has no running statistics. Input float32 ``(B, H, W, C)`` in [-1, 1] (any
    size: the pooling is global); returns ``(logits, features)`` as :class:`MNISTClassifier`.
    """

    stage_channels: Sequence[int] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = 10
    dropout_rate: float = 0.3

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        chex.assert_rank(x, 4)
        batch = x.shape[0]
        h = nn.Conv(self.stage_channels[0], (3, 3), name="stem")(x)
        for i, channels in enumerate(self.stage_channels):
            h = ResidualStage(channels, stride=1 if i == 0 else 2)(h)
        h = nn.relu(nn.GroupNorm(8)(h)).mean(axis=(1, 2))
        features = nn.relu(nn.Dense(self.feature_dim)(h))
        logits = nn.Dense(self.num_classes)(nn.Dropout(self.dropout_rate, deterministic=not train)(features))
        chex.assert_shape([logits, features], [(batch, self.num_classes), (batch, self.feature_dim)])
        return logits, features
