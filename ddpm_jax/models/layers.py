"""The networks' convolutions, BatchNorm and pooling, each computed through one seam: :class:`LayerOps`.

:class:`Conv3x3`, :class:`UpConv2x2` and :class:`BatchNorm` create exactly the parameters and
variables ``nn.Conv(features, (3, 3), padding='SAME')``,
``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID')`` and ``nn.BatchNorm``
create (same names, shapes and initializers; ``scale``, ``bias`` and ``batch_stats`` ``mean``,
``var`` for the norm), and :func:`max_pool_2x2` and :func:`add_per_example_channel_bias` are
``nn.max_pool(x, (2, 2), strides=(2, 2))`` and a per-example broadcast add. What each computes
with is a :class:`LayerOps`, a frozen set of pure functions a network is handed by whoever
builds it (``ops``) and passes to its layers. :data:`PLAIN` computes with XLA's own operations
(``lax.conv_general_dilated``, ``lax.conv_transpose``, ``nn.max_pool``, Flax's BatchNorm
arithmetic). Another :class:`LayerOps` may compute the same functions in another order (other
forms of the same sums of the same products, custom gradients), never other functions: results
agree to float32 rounding, and checkpoints do not depend on which one wrote them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class LayerOps:
    """The pure functions the layers compute with; equal instances give equal (hashable) networks.

    Attributes:
      name: what the instance is called in a network's repr.
      conv3x3: 3x3 ``SAME`` convolution (cross-correlation, as XLA's), no bias:
        ``x`` ``(B, H, W, C)``, ``kernel`` ``(3, 3, C, O)`` -> ``(B, H, W, O)``.
      conv_transpose2x2: Flax's 2x2 stride-2 ``VALID`` transposed convolution (no ``transpose_kernel``),
        no bias: ``x`` ``(B, H, W, C)``, ``kernel`` ``(2, 2, C, O)`` -> ``(B, 2H, 2W, O)``.
      add_bias: ``y + bias`` for ``y`` ``(..., C)``, ``bias`` ``(C,)``.
      add_per_example_bias: ``h + v[:, None, None, :]`` for ``h`` ``(B, H, W, C)``, ``v`` ``(B, C)``.
      batch_norm_train: training-mode batch normalization over all axes but the last,
        ``(x32, scale, bias, epsilon) -> (y, mean, var)``: ``x32`` ``(..., C)`` float32,
        ``scale``/``bias`` ``(C,)``, ``y = (x32 - mean) * (rsqrt(var + epsilon) * scale) + bias`` with the
        batch's ``mean`` and ``var = max(E[x^2] - mean^2, 0)``, all float32 (``nn.BatchNorm``'s arithmetic).
      max_pool2x2: ``nn.max_pool(x, (2, 2), strides=(2, 2))`` and its gradient (ties to the first maximum):
        ``x`` ``(B, H, W, C)``, H and W even -> ``(B, H/2, W/2, C)``.
    """

    name: str
    conv3x3: Callable = dataclasses.field(repr=False)
    conv_transpose2x2: Callable = dataclasses.field(repr=False)
    add_bias: Callable = dataclasses.field(repr=False)
    add_per_example_bias: Callable = dataclasses.field(repr=False)
    batch_norm_train: Callable = dataclasses.field(repr=False)
    max_pool2x2: Callable = dataclasses.field(repr=False)


def conv3x3_xla(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """XLA's 3x3 ``SAME`` convolution: ``x`` ``(B, H, W, C)``, ``kernel`` ``(3, 3, C, O)`` -> ``(B, H, W, O)``."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMENSION_NUMBERS)


def conv_transpose2x2_xla(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """XLA's 2x2 stride-2 ``VALID`` transposed convolution, as ``nn.ConvTranspose`` calls it.

    ``x`` ``(B, H, W, C)``, ``kernel`` ``(2, 2, C, O)`` -> ``(B, 2H, 2W, O)``.
    """
    return lax.conv_transpose(x, kernel, (2, 2), "VALID", dimension_numbers=_DIMENSION_NUMBERS)


def add_bias(y: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """``y`` ``(..., C)`` plus ``bias`` ``(C,)``."""
    return y + bias


def add_per_example_bias(h: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """``h`` ``(B, H, W, C)`` plus ``v`` ``(B, C)`` at every pixel of its example."""
    return h + v[:, None, None, :]


def batch_norm_train(x32: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
                     epsilon: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """``nn.BatchNorm``'s training-mode arithmetic (``use_fast_variance``): see :class:`LayerOps`."""
    axes = tuple(range(x32.ndim - 1))
    mean = x32.mean(axes)
    var = jnp.maximum((x32 * x32).mean(axes) - mean * mean, 0.0)
    y = (x32 - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
    return y, mean, var


def max_pool2x2_xla(x: jnp.ndarray) -> jnp.ndarray:
    """``nn.max_pool(x, (2, 2), strides=(2, 2))``: ``(B, H, W, C)`` -> ``(B, H/2, W/2, C)``."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


# XLA's own operations: the default of every layer and network.
PLAIN = LayerOps(name="plain", conv3x3=conv3x3_xla, conv_transpose2x2=conv_transpose2x2_xla, add_bias=add_bias,
                 add_per_example_bias=add_per_example_bias, batch_norm_train=batch_norm_train,
                 max_pool2x2=max_pool2x2_xla)


def max_pool_2x2(x: jnp.ndarray, ops: LayerOps = PLAIN) -> jnp.ndarray:
    """``nn.max_pool(x, (2, 2), strides=(2, 2))`` by ``ops``. ``x``: ``(B, H, W, C)``, H and W even."""
    chex.assert_rank(x, 4)
    return ops.max_pool2x2(x)


def add_per_example_channel_bias(h: jnp.ndarray, v: jnp.ndarray, ops: LayerOps = PLAIN) -> jnp.ndarray:
    """``h + v[:, None, None, :]`` by ``ops``, for ``h`` ``(B, H, W, C)`` and ``v`` ``(B, C)`` (a block's time
    embedding)."""
    chex.assert_rank(h, 4)
    chex.assert_shape(v, (h.shape[0], h.shape[-1]))
    return ops.add_per_example_bias(h, v)


class _KernelAndBias(nn.Module):
    """The parameters Flax's ``nn.Conv`` / ``nn.ConvTranspose`` create: ``kernel (k, k, C_in, features)``, ``bias``."""

    features: int
    ops: LayerOps = PLAIN
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    def kernel_and_bias(self, x: jnp.ndarray, size: int):
        """``(x, kernel, bias)`` promoted to the computation dtype, as Flax's layers do."""
        kernel = self.param("kernel", self.kernel_init, (size, size, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)


class Conv3x3(_KernelAndBias):
    """``nn.Conv(features, (3, 3), padding='SAME')``, same parameters, computed by ``ops``.

    ``x``: ``(B, H, W, C)`` -> ``(B, H, W, features)``.
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x, kernel, bias = self.kernel_and_bias(x, 3)
        return self.ops.add_bias(self.ops.conv3x3(x, kernel), bias)


class UpConv2x2(_KernelAndBias):
    """``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID')``, same parameters, computed by ``ops``.

    ``x``: ``(B, H, W, C)`` -> ``(B, 2H, 2W, features)``.
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x, kernel, bias = self.kernel_and_bias(x, 2)
        return self.ops.add_bias(self.ops.conv_transpose2x2(x, kernel), bias)


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over the last axis (statistics over all others), same variables and arithmetic.

    ``x`` ``(..., C)`` -> same shape, in ``dtype`` (default: ``x``'s).
    Statistics are float32 whatever ``dtype`` is, as in Flax; in training ``ops.batch_norm_train`` takes them.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    ops: LayerOps = PLAIN

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
            y = (x32 - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
        else:
            y, mean, var = self.ops.batch_norm_train(x32, scale, bias, self.epsilon)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y.astype(self.dtype or x.dtype)
