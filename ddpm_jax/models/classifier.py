"""The MNIST classifier whose penultimate activations are the feature space for FID.

It plays the role the Inception network plays for FID on natural images: a
fixed network trained once on real MNIST; generated and real images are
compared through its features, and its labels give the digit histogram.
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
