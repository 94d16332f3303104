"""The layers' CPU forms: :class:`~ddpm_jax.models.layers.LayerOps` that are fast on XLA's CPU backend, and
:func:`layer_ops`, the one switch from ``model.conv_impl`` to the ops a network is handed.

XLA's CPU convolution is fine at most of the U-Net's shapes but pathological
at a few (measured with ``python -m benchmarks.conv_shapes``): a 3x3 ``SAME``
convolution on a 2x2 map with 512 channels runs at ~2 GFLOP/s (0.7 s forward
at batch 128, against 7 ms as one matrix product; its input gradient alike),
and the weight gradient of a convolution with one input channel is 4x (Eigen)
to 10x (YNNPACK) slower than its im2col form.
Where that happens the convolution is computed here as one matrix product
over the nine shifted copies of the input (im2col), on maps of at most 2x2
pixels as a dense layer over all pixels (:func:`conv3x3_dense`), or, where it
writes one or two channels (an output layer), as one product with all nine taps
followed by a shifted sum (:func:`conv3x3_taps`, 4-6x faster than XLA's there):
the same sums of the same products, only in another order, so results agree to
float32 rounding. Where a C++ compiler is at hand, the 3x3 convolutions
use native CPU kernels (:mod:`ddpm_jax.cpu.kernels`) in the passes where
they were measured faster (:func:`conv3x3_plan`): XLA computes the weight gradient
of a 32x32 map at a quarter of the machine's matmul rate, and on maps of at most 8x8
pixels it multiplies the zero padding (16% of the products at 8x8, 56% at 2x2), which
the native kernel skips.
The 2x2 stride-2 transposed convolution is likewise two matrix
products (one per output row parity) interleaved by a concatenation, whose
gradients the native kernels compute where they are built
(:func:`upconv2x2_uses_native`), and
2x2 max-pooling gets a gradient that routes through a one-hot of each
window's first maximum instead of XLA's packed reduce-window (same values,
same gradient).
BatchNorm's per-channel sums over (batch, height, width), forward
and backward, are matrix products with a vector of ones: XLA's CPU backend
turns them into reduce-window ops that took a fifth of the seed U-Net's
train step (a BatchNorm layer's forward and backward run 1.4x (32x32 maps)
to 4x (2x2 maps) faster this way). Where the native kernels are built, each
pair of these sums (and each convolution's bias gradient) is instead one
parallel pass of :func:`cpu_kernels.channel_moments` that writes no product
out (:func:`batch_norm_sums_natively`). Likewise the gradient of a block's time
embedding, added per example and channel (:func:`add_per_example_channel_bias`):
a batched matrix-vector product (natively, one pass of
:func:`cpu_kernels.example_channel_sums`), where XLA would otherwise take the sum over the
batch for the embedding layer's bias in a second pass over the whole activation
gradient (3% of the seed U-Net's train step).

``conv_impl`` (:data:`CONV_IMPLS`) names the ops: ``'auto'`` (:data:`AUTO`, the faster
form per shape as measured on CPU, native kernels where they are built; on any other
backend XLA's own operations, :data:`ddpm_jax.models.layers.PLAIN`), ``'xla'`` (``PLAIN``
everywhere) or ``'matmul'`` (:data:`MATMUL`, the im2col forms and matrix-product sums
everywhere, no native kernels). Every one computes the same functions with the same
parameters, so checkpoints do not care which one wrote them.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ddpm_jax.cpu import kernels as cpu_kernels
from ddpm_jax.models.layers import PLAIN, LayerOps, conv3x3_xla

CONV_IMPLS = ("auto", "xla", "matmul")


def _check_impl(impl: str) -> None:
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution impl {impl!r}; allowed: {', '.join(CONV_IMPLS)}.")


def conv3x3_matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """3x3 ``SAME`` convolution (cross-correlation, as XLA's) as one im2col matrix product.

    ``x`` ``(B, H, W, C)``, ``kernel`` ``(3, 3, C, O)`` -> ``(B, H, W, O)``.
    """
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Column order (i, j, c) matches kernel.reshape(9 * C, O).
    columns = jnp.concatenate([padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)
    return (columns.reshape(b * h * w, 9 * c) @ kernel.reshape(9 * c, -1)).reshape(b, h, w, -1)


def conv3x3_taps(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """3x3 ``SAME`` convolution as one matrix product per pixel with all nine taps, then a shifted sum (col2im).

    ``(B*H*W, C) @ (C, 9*O)`` gives every input pixel's contribution through each tap; output
    pixel ``p`` sums tap ``(i, j)``'s contribution of input pixel ``p + (i - 1, j - 1)``. It reads
    the input once and never copies it nine times as im2col does, so it is the fast form where
    the convolution writes few channels (an output layer's forward pass; its weight gradient
    is :func:`conv3x3_taps_weight_grad`).
    ``x`` ``(B, H, W, C)``, ``kernel`` ``(3, 3, C, O)`` -> ``(B, H, W, O)``.
    """
    b, h, w, c = x.shape
    o = kernel.shape[-1]
    per_tap = x.reshape(b * h * w, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, 9 * o)
    padded = jnp.pad(per_tap.reshape(b, h, w, 9, o), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    return sum(padded[:, i : i + h, j : j + w, 3 * i + j] for i in range(3) for j in range(3))


def conv3x3_taps_weight_grad(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """The kernel gradient of :func:`conv3x3_taps`: ``x^T`` times the nine shifted copies of ``g``.

    Tap ``(i, j)`` of input pixel ``q`` reached output pixel ``q - (i - 1, j - 1)``, so its
    gradient pairs ``x[q]`` with ``g`` there: one product over all pixels of the input's
    channels with the output gradient's im2col, cheap where ``g`` has few channels.
    (Autodiff of the shifted sum builds the same columns through nine padded copies.)
    ``x`` ``(B, H, W, C)``, ``g`` ``(B, H, W, O)`` -> ``(3, 3, C, O)``.
    """
    b, h, w, c = x.shape
    o = g.shape[-1]
    padded = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    columns = jnp.concatenate([padded[:, 2 - i : 2 - i + h, 2 - j : 2 - j + w, :] for i in range(3) for j in range(3)],
                              axis=-1)
    per_tap = x.reshape(b * h * w, c).T @ columns.reshape(b * h * w, 9 * o)
    return per_tap.reshape(c, 3, 3, o).transpose(1, 2, 0, 3)


def dense_conv_matrix(kernel: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """The ``(H*W*C, H*W*O)`` matrix of a 3x3 ``SAME`` convolution on an ``H x W`` map (at most 2x2).

    Row ``(q, c)``, column ``(p, o)`` holds ``kernel`` tap ``q - p + 1`` (input pixel ``q``,
    output pixel ``p``, both in row-major order) for channels ``c -> o``. One gather straight
    into this layout, with no transpose after it: XLA hoists a gather of a fixed kernel out of
    a sampling loop but not a transpose, which would copy the matrix at every step.
    ``kernel`` ``(3, 3, C, O)``.
    """
    if height > 2 or width > 2:
        raise ValueError(f"the dense 3x3 convolution needs a map of at most 2x2 pixels, got {height}x{width}.")
    c = kernel.shape[2]
    pixels = [(i, j) for i in range(height) for j in range(width)]
    taps = np.array([[(qi - pi + 1) * 3 + (qj - pj + 1) for pi, pj in pixels] for qi, qj in pixels])
    # Index arrays broadcast to (q, c, p); the output channels o follow whole.
    matrix = kernel.reshape(9, c, -1)[taps[:, None, :], np.arange(c)[None, :, None]]
    return matrix.reshape(height * width * c, -1)


def conv3x3_dense(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """3x3 ``SAME`` convolution of a map of at most 2x2 pixels as one dense matrix product.

    On such a map every input pixel lies in every output pixel's window, so the
    convolution is a dense layer over all pixels and channels, ``(B, H*W*C) @ (H*W*C, H*W*O)``
    (:func:`dense_conv_matrix`). It skips the zero padding's products im2col multiplies
    (16 of 36 pixel pairs on a 2x2 map), and where the kernel is fixed (a sampling loop)
    XLA builds the matrix once. ``x`` ``(B, H, W, C)``, ``kernel`` ``(3, 3, C, O)`` -> ``(B, H, W, O)``.
    """
    b, h, w, c = x.shape
    return (x.reshape(b, h * w * c) @ dense_conv_matrix(kernel, h, w)).reshape(b, h, w, -1)


def conv3x3_dense_transpose(g: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """The input gradient of :func:`conv3x3_dense`: ``g @ M^T`` for its matrix ``M``.

    ``M^T`` is the dense matrix of :func:`flipped_kernel` (``kernel``), so this is the same
    convolution the other forms compute for the input gradient, with the matrix of the
    forward pass read transposed instead of a second one built.
    ``g`` ``(B, H, W, O)``, ``kernel`` ``(3, 3, C, O)`` -> ``(B, H, W, C)``.
    """
    b, h, w, o = g.shape
    return (g.reshape(b, h * w * o) @ dense_conv_matrix(kernel, h, w).T).reshape(b, h, w, -1)


class Conv3x3Plan(NamedTuple):
    """How :func:`conv3x3` (:class:`~ddpm_jax.models.layers.Conv3x3`'s) computes each of its three passes:
    one of :data:`CONV3X3_FORMS` each.

    ``input_grad`` is the convolution of the output gradient with the kernel flipped in
    space and its channel axes swapped, computed by that form's forward pass (``'xla'``:
    XLA's transposed convolution, as autodiff makes it; ``'dense'``: the forward pass's
    matrix read transposed, :func:`conv3x3_dense_transpose`).
    """

    forward: str
    input_grad: str
    weight_grad: str


CONV3X3_FORMS = ("xla", "native", "matmul", "dense", "taps")


def flipped_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
    """``(3, 3, C, O)`` -> ``(3, 3, O, C)``: the kernel whose convolution is the input gradient's."""
    return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def _conv_by(form: str, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return {"xla": conv3x3_xla, "native": cpu_kernels.conv3x3, "matmul": conv3x3_matmul,
            "dense": conv3x3_dense, "taps": conv3x3_taps}[form](x, kernel)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_planned(x: jnp.ndarray, kernel: jnp.ndarray, plan: Conv3x3Plan) -> jnp.ndarray:
    """3x3 ``SAME`` convolution whose forward pass, input gradient and weight gradient each take
    the form ``plan`` names (:func:`conv3x3_plan`); the same function in every form."""
    return _conv_by(plan.forward, x, kernel)


def _planned_fwd(x, kernel, plan):
    return _conv_by(plan.forward, x, kernel), (x, kernel)


def _planned_bwd(plan, residual, g):
    x, kernel = residual
    if plan.input_grad == "xla":
        (x_grad,) = jax.linear_transpose(lambda x_: conv3x3_xla(x_, kernel), x)(g)
    elif plan.input_grad == "dense":
        x_grad = conv3x3_dense_transpose(g, kernel)
    elif plan.input_grad == "native":
        x_grad = cpu_kernels.conv3x3_input_grad(g, kernel)
    else:
        x_grad = _conv_by(plan.input_grad, g, flipped_kernel(kernel))
    if plan.weight_grad == "native":
        kernel_grad = cpu_kernels.conv3x3_weight_grad(x, g)
    elif plan.weight_grad == "taps":
        kernel_grad = conv3x3_taps_weight_grad(x, g)
    else:
        (kernel_grad,) = jax.linear_transpose(lambda k: _conv_by(plan.weight_grad, x, k), kernel)(g)
    return x_grad, kernel_grad


conv3x3_planned.defvjp(_planned_fwd, _planned_bwd)


def conv3x3_plan(x: jnp.ndarray, features: int, impl: str = "auto") -> Conv3x3Plan:
    """The form of each pass :class:`~ddpm_jax.models.layers.Conv3x3` computes this input ``(B, H, W, C)`` with.

    ``'xla'`` and ``'matmul'`` impls: that form in every pass. ``'auto'`` on CPU picks
    per pass what ``python -m benchmarks.conv_shapes`` measured faster for both presets'
    shapes. Where the native kernels are built (:func:`cpu_kernels.kernels_available`) and the
    input is float32, a pass is native where the channels it writes are whole vectors and:

    - forward: maps at most :data:`cpu_kernels.SMALL_MAP_WIDTH` (8) pixels wide, where the
      kernel blocks pixels across images and skips the zero padding, or maps of at least
      14x14 with at most 64 output channels and at most twice as many input channels;
    - input gradient: maps at most 8 pixels wide, or maps of at least 7x7 with at most 64
      output channels;
    - weight gradient: maps of at least 7x7 with at most 128 input channels;
    - both gradients of an output layer (one or two output channels, whole vectors of input
      channels) on maps of at least 7x7: the native weight gradient then runs with its two
      operands swapped, the input gradient reads the one or two channels.

    On maps of at most 2x2 pixels (where XLA's convolution is pathological) the other passes
    are, forward, :func:`conv3x3_dense` and, for the gradients, the im2col product (the dense
    form's input gradient, :func:`conv3x3_dense_transpose`, contracts the matrix over its minor
    axis, which XLA's CPU matrix product runs at about a quarter of the speed of the other way
    round). Elsewhere they are XLA's, except where the convolution that computes them writes
    one or two channels (:func:`conv3x3_taps`; for the weight gradient: where the layer
    has one or two output channels), or else reads one or two channels (the im2col
    product, :func:`conv3x3_uses_matmul`): XLA is several times slower at both.
    ``'auto'`` on any other backend: XLA's everywhere.
    """
    _check_impl(impl)
    if impl != "auto":
        return Conv3x3Plan(impl, impl, impl)
    if jax.default_backend() != "cpu":
        return Conv3x3Plan("xla", "xla", "xla")
    _, h, w, c = x.shape

    def by_channels(reads: int, writes: int) -> str:
        return "taps" if writes <= 2 else "matmul" if conv3x3_uses_matmul(h, w, reads, impl) else "xla"

    # (channels read, channels written) of the convolution behind each pass; the weight gradient's
    # taps form reads the input and writes nine copies of the output gradient's channels.
    if h <= 2 and w <= 2:
        fallback = Conv3x3Plan("dense", "matmul", "matmul")
    else:
        fallback = Conv3x3Plan(forward=by_channels(c, features), input_grad=by_channels(features, c),
                               weight_grad=by_channels(c, features))
    if x.dtype != jnp.float32 or not cpu_kernels.kernels_available():
        return fallback
    whole = cpu_kernels.whole_vectors
    # Maps whose rows are too short to fill a block of pixels: the native convolution blocks the same
    # pixel across images there and skips the zero padding's products (cpu_kernels.conv3x3).
    small = w <= cpu_kernels.SMALL_MAP_WIDTH
    # An output layer (one or two channels written, whole vectors read) takes both gradients natively:
    # the weight gradient with the kernel's operands swapped (cpu_kernels.conv3x3_weight_grad).
    output_layer = features <= 2 and whole(c) and h * w >= 49
    native = Conv3x3Plan(
        forward=whole(features) and (small or (h * w >= 196 and features <= 64 and c <= 2 * features)),
        input_grad=output_layer or (whole(c) and (small or (h * w >= 49 and features <= 64))),
        weight_grad=output_layer or (whole(features) and h * w >= 49 and c <= 128),
    )
    return Conv3x3Plan(*("native" if use else form for use, form in zip(native, fallback)))


def conv3x3_uses_matmul(height: int, width: int, in_channels: int, impl: str = "auto") -> bool:
    """Whether :class:`~ddpm_jax.models.layers.Conv3x3` computes this shape as a matrix product.

    ``auto``: on CPU, for maps of at most 2x2 pixels (where XLA's convolution
    is pathological) and for one or two input channels (where its weight
    gradient is); XLA's convolution elsewhere and on every other backend.
    """
    _check_impl(impl)
    if impl != "auto":
        return impl == "matmul"
    return jax.default_backend() == "cpu" and (height * width <= 4 or in_channels <= 2)


@jax.custom_vjp
def max_pool_2x2_first_max(x: jnp.ndarray) -> jnp.ndarray:
    """``nn.max_pool(x, (2, 2), strides=(2, 2))``, with a cheaper gradient on CPU.

    JAX differentiates XLA's windowed max through a packed reduce-window that
    is slow on CPU; here the backward pass is a one-hot of each window's first
    maximum, the same gradient (ties included). ``x``: ``(B, H, W, C)``, H and W even.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _windows(x: jnp.ndarray) -> jnp.ndarray:
    """``(B, H, W, C)`` -> ``(B, H/2, W/2, C, 4)``: each 2x2 window in row-major order."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)


def _max_pool_fwd(x):
    windows = _windows(x)
    # argmax takes the first maximum: where a window ties (flat background), the gradient goes where
    # XLA's select-and-scatter sends it, so this is the same function with the same gradient.
    return windows.max(axis=-1), (windows.argmax(axis=-1), x.shape)


def _max_pool_bwd(residual, g):
    first_max, (b, h, w, c) = residual
    grad = jax.nn.one_hot(first_max, 4, dtype=g.dtype) * g[..., None]
    return (grad.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c),)


max_pool_2x2_first_max.defvjp(_max_pool_fwd, _max_pool_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_bias_summed_by_matmul(y, bias, native):
    return y + bias


def _add_bias_fwd(y, bias, native):
    return y + bias, None


def _add_bias_bwd(native, _, g):
    g32 = g.astype(jnp.float32)
    if native:  # the kernel's second sum (of g * g) comes along unused: one pass either way
        total = cpu_kernels.channel_moments(g32, g32, jnp.zeros(g.shape[-1], jnp.float32))[0]
    else:
        total = channel_sum(g32)
    return g, total.astype(g.dtype)


_add_bias_summed_by_matmul.defvjp(_add_bias_fwd, _add_bias_bwd)

@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_per_example_summed_by_matmul(h, v, native):
    return h + v[:, None, None, :]


def _add_per_example_fwd(h, v, native):
    return h + v[:, None, None, :], None


def _add_per_example_bwd(native, _, g):
    b, height, width, c = g.shape
    g32 = g.astype(jnp.float32)
    # Per example and channel, the sum over the image. Left to autodiff, XLA also folds it into the sum over
    # the batch that the embedding layer's bias gradient takes, and computes that as a second pass over the
    # whole activation gradient (a reduce-window, 4x slower). As one batched matrix-vector product, XLA first
    # copies g into (B, C, H*W) order; the native kernel reads it once as it is.
    if native:
        summed = cpu_kernels.example_channel_sums(g32)
    else:
        summed = jnp.einsum("bpc,p->bc", g32.reshape(b, height * width, c), jnp.ones((height * width,), jnp.float32))
    return g, summed.astype(g.dtype)


_add_per_example_summed_by_matmul.defvjp(_add_per_example_fwd, _add_per_example_bwd)

def upconv2x2_matmul(x: jnp.ndarray, kernel: jnp.ndarray, native_grads: bool = False) -> jnp.ndarray:
    """Flax's 2x2 stride-2 ``VALID`` transposed convolution as two matrix products, one per output row parity.

    Output pixel ``(2h + a, 2w + b)`` is ``x[h, w] @ kernel[1 - a, 1 - b]``:
    each input pixel paints its own 2x2 patch (Flax's ``ConvTranspose``
    without ``transpose_kernel`` applies the kernel flipped). The output rows
    ``2h + a`` of one parity ``a`` are one product ``(B*H*W, C) @ (C, 2*O)``
    whose columns ``(b, o)`` are already in NHWC order, and the two are
    interleaved by a concatenation of whole rows. One product over all four
    taps would need a 6-D transpose of its output and of the output gradient,
    which XLA's CPU backend copies element by element (the cpu preset's train
    step is about 12% faster this way).
    ``native_grads``: both gradients by the native kernels (:func:`upconv2x2_uses_native`), the
    same sums in another order.
    ``x`` ``(B, H, W, C)``, ``kernel`` ``(2, 2, C, O)`` -> ``(B, 2H, 2W, O)``.
    """
    _, _, c, o = kernel.shape
    # [a, c, (b, o)]: parity a's kernel taps side by side.
    row_kernels = jnp.flip(kernel, (0, 1)).transpose(0, 2, 1, 3).reshape(2, c, 2 * o)
    return (_upconv_rows_native if native_grads else _upconv_rows)(x, row_kernels)


def upconv2x2_uses_native(x: jnp.ndarray, features: int, impl: str = "auto") -> bool:
    """Whether :class:`~ddpm_jax.models.layers.UpConv2x2` takes its gradients from the native kernels:
    ``'auto'`` on a CPU where they are built, float32, whole vectors of input channels and of twice the
    output channels.

    XLA computes the weight gradient as two products contracting both operands' major axes (at
    25-35 GFLOP/s), after copying each row parity out of the output gradient: in a ``jax.profiler``
    trace of the cpu preset's train step its two up-convolutions' gradients took 5.0 ms (3.3 of
    them the weight gradients' products), natively 1.7.
    """
    _check_impl(impl)
    whole = cpu_kernels.whole_vectors
    return (impl == "auto" and jax.default_backend() == "cpu" and x.dtype == jnp.float32
            and whole(x.shape[-1]) and whole(2 * features) and cpu_kernels.kernels_available())


def _upconv_rows(x: jnp.ndarray, row_kernels: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    o = row_kernels.shape[-1] // 2
    pixels = x.reshape(b * h * w, c)
    rows = [(pixels @ row_kernels[a]).reshape(b, h, 1, w, 2 * o) for a in range(2)]
    return jnp.concatenate(rows, axis=2).reshape(b, 2 * h, 2 * w, o)


@jax.custom_vjp
def _upconv_rows_native(x: jnp.ndarray, row_kernels: jnp.ndarray) -> jnp.ndarray:
    """:func:`_upconv_rows` whose two gradients are native kernels that read the output gradient in place:
    XLA copies each parity's rows out of it and contracts the products' major axes, several times slower."""
    return _upconv_rows(x, row_kernels)


def _upconv_rows_native_fwd(x, row_kernels):
    return _upconv_rows(x, row_kernels), (x, row_kernels)


def _upconv_rows_native_bwd(residual, g):
    x, row_kernels = residual
    return cpu_kernels.upconv2x2_input_grad(g, row_kernels), cpu_kernels.upconv2x2_weight_grad(x, g)


_upconv_rows_native.defvjp(_upconv_rows_native_fwd, _upconv_rows_native_bwd)


def channel_sum(x: jnp.ndarray) -> jnp.ndarray:
    """Sum of ``x`` ``(..., C)`` float32 over every axis but the last, as one matrix-vector product -> ``(C,)``."""
    channels = x.shape[-1]
    return jnp.ones((x.size // channels,), x.dtype) @ x.reshape(-1, channels)


def _batch_statistics(x: jnp.ndarray, native: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-channel mean and E[x^2] - mean^2 (unclipped), as Flax's ``use_fast_variance`` computes them."""
    count = x.size // x.shape[-1]
    if native:
        total, total_of_squares = cpu_kernels.channel_moments(x, x, jnp.zeros(x.shape[-1], x.dtype))
    else:
        total, total_of_squares = channel_sum(x), channel_sum(x * x)
    mean = total / count
    return mean, total_of_squares / count - mean * mean


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_matmul(x, scale, bias, epsilon, native=False):
    """Training-mode batch normalization over all axes but the last, sums as matrix products.

    ``x`` ``(..., C)`` float32, ``scale``/``bias`` ``(C,)`` -> ``(y, mean, var)``:
    ``y = (x - mean) * scale / sqrt(var + epsilon) + bias`` with the batch's
    ``mean`` and (biased, clipped at 0) ``var``, all float32: ``nn.BatchNorm``'s
    arithmetic. The gradient is the closed form (Ioffe & Szegedy 2015), whose
    two per-channel sums are matrix products too; autodiff would turn them
    into reduce-windows again. ``native``: both passes' per-channel sums by
    :func:`cpu_kernels.channel_moments` instead, each pair in one parallel pass
    that writes no product out (the same sums in another order).
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, native)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, native):
    mean, raw_var = _batch_statistics(x, native)
    var = jnp.maximum(raw_var, 0.0)
    inv_std = lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv_std * scale) + bias
    return (y, mean, var), (x, scale, mean, inv_std, raw_var > 0)


def _batch_norm_bwd(epsilon, native, residual, cotangents):
    x, scale, mean, inv_std, var_not_clipped = residual
    dy, dmean, dvar = cotangents  # dmean, dvar: zero unless a caller differentiates the statistics
    count = x.size // x.shape[-1]
    centered = x - mean
    if native:
        dbias, dy_dot_centered = cpu_kernels.channel_moments(dy, x, mean)
        dscale = dy_dot_centered * inv_std
    else:
        dbias = channel_sum(dy)
        dscale = channel_sum(dy * (centered * inv_std))
    # d var / dx = 2 (x - mean) / count, and nothing where the variance was clipped to 0.
    dvar_total = jnp.where(var_not_clipped, dvar - 0.5 * scale * inv_std**2 * dscale, 0.0)
    dmean_total = dmean - scale * inv_std * dbias
    dx = scale * inv_std * dy + dmean_total / count + dvar_total * 2.0 * centered / count
    return dx, dscale, dbias


batch_norm_matmul.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm_sums_natively(impl: str = "auto") -> bool:
    """Whether :class:`~ddpm_jax.models.layers.BatchNorm` (and the bias adds) take their per-channel sums with
    :func:`cpu_kernels.channel_moments`: for ``'auto'`` where the native kernels are built (CPU, one device);
    ``'matmul'`` keeps the products."""
    _check_impl(impl)
    return impl == "auto" and cpu_kernels.kernels_available()



# ---------------------------------------------------------------------------
# The ops of impls 'auto' (on a CPU) and 'matmul', and the switch
# ---------------------------------------------------------------------------


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray, impl: str = "auto") -> jnp.ndarray:
    """3x3 ``SAME`` convolution in the forms :func:`conv3x3_plan` picks for ``impl`` (``'auto'`` or ``'matmul'``);
    XLA's convolution itself, with autodiff's gradients, where it picks XLA's in every pass.

    ``x`` ``(B, H, W, C)``, ``kernel`` ``(3, 3, C, O)`` -> ``(B, H, W, O)``.
    """
    plan = conv3x3_plan(x, kernel.shape[-1], impl)
    return conv3x3_xla(x, kernel) if plan == Conv3x3Plan("xla", "xla", "xla") else conv3x3_planned(x, kernel, plan)


def conv_transpose2x2(x: jnp.ndarray, kernel: jnp.ndarray, impl: str = "auto") -> jnp.ndarray:
    """Flax's 2x2 stride-2 transposed convolution as :func:`upconv2x2_matmul`, with native gradients where
    :func:`upconv2x2_uses_native`. ``x`` ``(B, H, W, C)``, ``kernel`` ``(2, 2, C, O)`` -> ``(B, 2H, 2W, O)``."""
    return upconv2x2_matmul(x, kernel, upconv2x2_uses_native(x, kernel.shape[-1], impl))


def add_channel_bias(y: jnp.ndarray, bias: jnp.ndarray, impl: str = "auto") -> jnp.ndarray:
    """``y + bias`` for ``y`` ``(..., C)``, ``bias`` ``(C,)``, whose bias gradient (a sum over all other axes)
    is one matrix product instead of XLA's CPU reduce-window, or where :func:`batch_norm_sums_natively`,
    one parallel pass of :func:`cpu_kernels.channel_moments`."""
    return _add_bias_summed_by_matmul(y, bias, batch_norm_sums_natively(impl))


def add_per_example_channel_bias(h: jnp.ndarray, v: jnp.ndarray, impl: str = "auto") -> jnp.ndarray:
    """``h + v[:, None, None, :]`` for ``h`` ``(B, H, W, C)``, ``v`` ``(B, C)`` (a block's time embedding), whose
    ``v`` gradient (a sum over H and W) is a matrix product, or where :func:`batch_norm_sums_natively`, one
    pass of :func:`cpu_kernels.example_channel_sums`."""
    return _add_per_example_summed_by_matmul(h, v, batch_norm_sums_natively(impl))


def batch_norm(x32: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float,
               impl: str = "auto") -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """:func:`batch_norm_matmul`, its sums native where :func:`batch_norm_sums_natively`: ``(y, mean, var)``."""
    return batch_norm_matmul(x32, scale, bias, epsilon, batch_norm_sums_natively(impl))


def _ops(impl: str) -> LayerOps:
    return LayerOps(name=impl, conv3x3=partial(conv3x3, impl=impl),
                    conv_transpose2x2=partial(conv_transpose2x2, impl=impl),
                    add_bias=partial(add_channel_bias, impl=impl),
                    add_per_example_bias=partial(add_per_example_channel_bias, impl=impl),
                    batch_norm_train=partial(batch_norm, impl=impl), max_pool2x2=max_pool_2x2_first_max)


# Built once: networks built from equal configs hold the same ops, so they are equal (and hash alike).
AUTO = _ops("auto")
MATMUL = _ops("matmul")


def layer_ops(conv_impl: str, *, input_gradients: bool = False) -> LayerOps:
    """The ops a network computes with for ``model.conv_impl`` (:data:`CONV_IMPLS`); the one switch.

    ``'xla'``: :data:`ddpm_jax.models.layers.PLAIN`; ``'matmul'``: :data:`MATMUL`; ``'auto'``: :data:`AUTO`
    where JAX's default backend is the CPU, else ``PLAIN``. Which passes of ``AUTO`` are native is decided
    when a network is traced, per shape (:func:`conv3x3_plan`, :func:`cpu_kernels.kernels_available`).

    ``input_gradients``: the network is differentiated with respect to its input inside a sampler's loop
    (classifier guidance's noise-aware classifier). There ``'auto'`` on the CPU is :data:`MATMUL`: inside a
    ``lax.scan`` the input gradient of XLA's CPU convolutions ran 3.5x slower than outside one (0.16 s against
    0.046 s as im2col matrix products, per step of 100 images on 2 cores); guided sampling of 100 images at
    T = 100 took 35.9 s with them and 13.0 s without.
    """
    _check_impl(conv_impl)
    on_cpu = jax.default_backend() == "cpu"
    if conv_impl == "matmul" or (conv_impl == "auto" and on_cpu and input_gradients):
        return MATMUL
    if conv_impl == "auto" and on_cpu:
        return AUTO
    return PLAIN
