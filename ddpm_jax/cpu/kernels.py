"""Native CPU kernels for the U-Net's convolutions, their gradients and per-channel sums, built on first use.

XLA's CPU backend computes a 3x3 convolution's weight gradient as an Eigen
convolution with an ``(H, W)`` "kernel" behind two layout transposes: 23-70
GFLOP/s on this project's 32x32, 28x28 and 16x16 maps, against 150-270 for
the register-blocked loop in ``conv3x3_cpu.cc`` beside this file, which reads
the NHWC buffers in place. Its forward convolution (and so the input
gradient, a convolution with the flipped kernel) is likewise slow with few
channels on large maps, where the file's second loop is faster
(``python -m benchmarks.conv_shapes``). On maps at most 8 pixels wide a third loop
blocks the same pixel of consecutive images instead of a row's pixels and skips
the zero padding's products, where XLA multiplies them (16% of the products on
an 8x8 map, 56% on a 2x2): faster than XLA's forward pass and input gradient at
every small map of both presets. All run as XLA FFI custom calls on
XLA's own intra-op thread pool; :mod:`ddpm_jax.cpu.layers` decides per
shape which convolution takes which. A third kernel, :func:`channel_moments`,
takes BatchNorm's per-channel sums in one parallel pass over the activations, and
:func:`example_channel_sums` the time embedding's per-example ones. Two more compute
the 2x2 stride-2 transposed convolution's gradients (:func:`upconv2x2_weight_grad`,
:func:`upconv2x2_input_grad`), reading its output gradient in place where XLA copies
each row parity out and contracts the products' major axes at a fraction of its rate.

The source is compiled once per machine, compiler and jaxlib, with
``-O3 -march=native``, into ``$DDPM_JAX_CACHE_DIR`` (default
``~/.cache/ddpm_jax``), and loaded from there afterwards. Where no C++
compiler is found or the build fails, :func:`kernels_available` returns
False after one warning that says why, and the layers keep XLA's
convolutions (the same sums in another order). ``DDPM_JAX_NATIVE_KERNELS=0``
turns the kernels off without a warning. ``$CXX`` names the compiler
(default: the first of ``c++``, ``g++``, ``clang++`` on the ``PATH``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.utils import cache

SOURCE = Path(__file__).with_name("conv3x3_cpu.cc")
CONV3X3_TARGET = "ddpm_jax_conv3x3"
CONV3X3_ACROSS_IMAGES_TARGET = "ddpm_jax_conv3x3_across_images"
INPUT_GRAD_ACROSS_IMAGES_TARGET = "ddpm_jax_conv3x3_across_images_input_grad"
WEIGHT_GRAD_TARGET = "ddpm_jax_conv3x3_weight_grad"
MOMENTS_TARGET = "ddpm_jax_channel_moments"
UPCONV_WEIGHT_GRAD_TARGET = "ddpm_jax_upconv2x2_weight_grad"
UPCONV_INPUT_GRAD_TARGET = "ddpm_jax_upconv2x2_input_grad"
EXAMPLE_SUMS_TARGET = "ddpm_jax_example_channel_sums"
# FFI target name -> the handler's symbol in the library.
TARGETS = {CONV3X3_TARGET: "Conv3x3", CONV3X3_ACROSS_IMAGES_TARGET: "Conv3x3AcrossImages",
           INPUT_GRAD_ACROSS_IMAGES_TARGET: "Conv3x3AcrossImagesInputGrad", WEIGHT_GRAD_TARGET: "Conv3x3WeightGrad",
           MOMENTS_TARGET: "ChannelMoments", UPCONV_WEIGHT_GRAD_TARGET: "UpConv2x2WeightGrad",
           UPCONV_INPUT_GRAD_TARGET: "UpConv2x2InputGrad", EXAMPLE_SUMS_TARGET: "ExampleChannelSums"}
# The kernels' widest vector is 16 floats; the channels they write must fill whole vectors.
CHANNEL_MULTIPLE = 16
# Maps at most this wide: conv3x3 blocks output pixels across images, not along a row.
SMALL_MAP_WIDTH = 8
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def whole_vectors(channels: int) -> bool:
    """Whether ``channels`` fill whole vectors of :data:`CHANNEL_MULTIPLE`, as the channels a kernel writes must."""
    return channels % CHANNEL_MULTIPLE == 0


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def _build(compiler: str) -> Path:
    """The shared library for this machine, compiled unless the cache holds it; raises on failure."""
    # -march=native means the library is only good for processors with this one's features: the
    # compiler's predefined macros for it (__AVX512F__, ...) go into the cache key.
    target = subprocess.run([compiler, "-march=native", "-E", "-dM", "-x", "c++", os.devnull],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(_FLAGS).encode(),
                 metadata.version("jaxlib").encode(), target.encode()):
        key.update(part)
    library = cache.cache_dir() / f"conv3x3_cpu-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compiled under a temporary name and renamed: processes building at once never load half a file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                       capture_output=True, text=True, check=True, timeout=300)
        os.replace(built, library)
    return library


@functools.cache
def kernels_available() -> bool:
    """Whether the native kernels are built, loaded and registered with XLA (CPU backend, one device).

    With several devices XLA's partitioner cannot split a custom call over the batch: it would gather
    each convolution's input onto every device and repeat the whole batch's work there, so XLA's own
    convolutions (which it does split) are kept.
    """
    if os.environ.get("DDPM_JAX_NATIVE_KERNELS", "1") == "0" or jax.default_backend() != "cpu" \
            or jax.device_count() != 1:
        return False
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler on the PATH (looked for $CXX, c++, g++, clang++)")
        library = ctypes.CDLL(str(_build(compiler)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"ddpm_jax: the native CPU kernels for 3x3 convolutions are not available "
                      f"({str(detail).strip()[-2000:]}); using XLA's, which trains slower on the CPU. "
                      f"Install a C++ compiler or name one in $CXX; DDPM_JAX_NATIVE_KERNELS=0 silences this.",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def _require_kernels() -> None:
    if not kernels_available():
        raise RuntimeError("the native convolution kernels are not available here (see the warning above, or "
                           "DDPM_JAX_NATIVE_KERNELS=0); ddpm_jax.cpu.layers.conv3x3_plan() chooses XLA's then.")


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray, blocking: str = "auto") -> jnp.ndarray:
    """3x3 ``SAME`` convolution (cross-correlation, as XLA's), no autodiff rule of its own.

    ``x`` ``(B, H, W, C)`` and ``kernel`` ``(3, 3, C, O)``, float32, ``O`` a
    multiple of :data:`CHANNEL_MULTIPLE` -> ``(B, H, W, O)``.

    The kernel keeps a block of output pixels in registers: ``blocking='rows'`` takes them from
    one row of the map, ``'images'`` takes the same pixel of consecutive images and skips the
    zero padding's products (16% of them on an 8x8 map, 31% on a 4x4, 56% on a 2x2). Both add
    the same products in the same order, so they return the same floats; ``'auto'`` takes
    ``'images'`` on maps at most :data:`SMALL_MAP_WIDTH` pixels wide, whose rows are too short
    to fill a block.
    """
    _require_kernels()
    chex.assert_rank((x, kernel), 4)
    chex.assert_shape(kernel, (3, 3, x.shape[-1], None))
    target = CONV3X3_ACROSS_IMAGES_TARGET if _blocks_across_images(x, blocking) else CONV3X3_TARGET
    out = jax.ShapeDtypeStruct((*x.shape[:3], kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, kernel)


def conv3x3_input_grad(dy: jnp.ndarray, kernel: jnp.ndarray, blocking: str = "auto") -> jnp.ndarray:
    """The gradient of ``sum(dy * conv3x3(x, kernel))`` with respect to ``x``.

    ``dy`` ``(B, H, W, O)`` and ``kernel`` ``(3, 3, C, O)``, float32, ``C`` a multiple of
    :data:`CHANNEL_MULTIPLE` -> ``(B, H, W, C)``: :func:`conv3x3` of ``dy`` with the kernel flipped
    in space and its channel axes swapped, the same floats. Blocked across images (``blocking`` as
    there), the kernel reads ``kernel`` as it is; along rows it is given the flipped copy.
    """
    _require_kernels()
    chex.assert_rank((dy, kernel), 4)
    chex.assert_shape(kernel, (3, 3, None, dy.shape[-1]))
    if not _blocks_across_images(dy, blocking):
        return conv3x3(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), "rows")
    out = jax.ShapeDtypeStruct((*dy.shape[:3], kernel.shape[2]), jnp.float32)
    return jax.ffi.ffi_call(INPUT_GRAD_ACROSS_IMAGES_TARGET, out, vmap_method="sequential")(dy, kernel)


def _blocks_across_images(x: jnp.ndarray, blocking: str) -> bool:
    if blocking not in ("auto", "rows", "images"):
        raise ValueError(f"blocking must be 'auto', 'rows' or 'images', got {blocking!r}.")
    return blocking == "images" or (blocking == "auto" and x.shape[2] <= SMALL_MAP_WIDTH)


def conv3x3_weight_grad(x: jnp.ndarray, dy: jnp.ndarray) -> jnp.ndarray:
    """The gradient of ``sum(dy * conv3x3(x, kernel))`` with respect to ``kernel`` (HWIO).

    ``x`` ``(B, H, W, C)`` and ``dy`` ``(B, H, W, O)``, float32, ``O`` or else ``C`` a multiple
    of :data:`CHANNEL_MULTIPLE` -> ``(3, 3, C, O)``.

    The kernel keeps vectors of ``dy``'s channels in registers. Where ``x``'s channels are whole
    vectors and more of them (an output layer, whose ``O`` of 1 or 2 is no whole vector; a
    decoder layer such as 32 -> 16, measured 20% faster so), it computes the weight gradient
    of the convolution from ``dy`` to ``x`` instead: with ``SAME`` padding, tap ``(i, j)`` of
    one pairs the pixels tap ``(2 - i, 2 - j)`` of the other does, so the same sums come back
    flipped in space and with the channel axes swapped.
    """
    _require_kernels()
    chex.assert_rank((x, dy), 4)
    chex.assert_equal_shape_prefix((x, dy), 3)
    if whole_vectors(x.shape[-1]) and (not whole_vectors(dy.shape[-1]) or x.shape[-1] > dy.shape[-1]):
        return jnp.flip(conv3x3_weight_grad(dy, x), (0, 1)).swapaxes(2, 3)
    kernel_shape = jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(WEIGHT_GRAD_TARGET, kernel_shape, vmap_method="sequential")(x, dy)


def upconv2x2_weight_grad(x: jnp.ndarray, dy: jnp.ndarray) -> jnp.ndarray:
    """The gradient of the 2x2 stride-2 transposed convolution's two row kernels.

    Output row ``2h + a`` of the convolution is ``x[b, h] @ row_kernels[a]``, ``(W, C) @ (C, 2O)``,
    whose columns ``(b', o)`` are output pixels ``(2w + b', o)``
    (:func:`ddpm_jax.cpu.layers.upconv2x2_matmul`). ``x`` ``(B, H, W, C)`` and ``dy``
    ``(B, 2H, 2W, O)``, float32, ``2O`` a multiple of :data:`CHANNEL_MULTIPLE` -> ``(2, C, 2O)``,
    the gradient of ``sum(dy * output)`` with respect to ``row_kernels``, read from ``dy`` in place.
    """
    _require_kernels()
    chex.assert_rank((x, dy), 4)
    chex.assert_shape(dy, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], None))
    out = jax.ShapeDtypeStruct((2, x.shape[-1], 2 * dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(UPCONV_WEIGHT_GRAD_TARGET, out, vmap_method="sequential")(x, dy)


def upconv2x2_input_grad(dy: jnp.ndarray, row_kernels: jnp.ndarray) -> jnp.ndarray:
    """The input gradient of the same convolution: ``sum over a of dy_a @ row_kernels[a]^T``.

    ``dy`` ``(B, 2H, 2W, O)`` and ``row_kernels`` ``(2, C, 2O)``, float32, ``C`` a multiple of
    :data:`CHANNEL_MULTIPLE` -> ``(B, H, W, C)``; ``dy_a`` is ``dy``'s rows of parity ``a``, each input
    pixel's ``2O`` values side by side, read in place.
    """
    _require_kernels()
    chex.assert_rank(dy, 4)
    chex.assert_shape(row_kernels, (2, None, 2 * dy.shape[-1]))
    b, h2, w2, _ = dy.shape
    out = jax.ShapeDtypeStruct((b, h2 // 2, w2 // 2, row_kernels.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(UPCONV_INPUT_GRAD_TARGET, out, vmap_method="sequential")(dy, row_kernels.swapaxes(1, 2))


def example_channel_sums(a: jnp.ndarray) -> jnp.ndarray:
    """Per example and channel, the sum over every other axis, in one parallel pass.

    ``a`` ``(B, ..., C)`` float32 -> ``(B, C)`` float32, summed as :func:`channel_moments` sums
    (float32 over blocks of 64 positions, float64 across blocks).
    """
    _require_kernels()
    chex.assert_rank(a, {2, 3, 4, 5})
    out = jax.ShapeDtypeStruct((a.shape[0], a.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(EXAMPLE_SUMS_TARGET, out, vmap_method="sequential")(a)


def channel_moments(a: jnp.ndarray, b: jnp.ndarray, shift: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-channel ``sum(a)`` and ``sum(a * (b - shift))`` over every axis but the last, in one pass.

    ``a``, ``b`` ``(..., C)`` and ``shift`` ``(C,)``, float32 -> two ``(C,)`` float32 arrays. Summed in
    float32 over blocks of 64 positions and in float64 across blocks, each part's totals added in part
    order: the same result at every call on a machine, whichever threads ran which parts.
    """
    _require_kernels()
    chex.assert_equal_shape((a, b))
    chex.assert_shape(shift, (a.shape[-1],))
    out = jax.ShapeDtypeStruct((2, a.shape[-1]), jnp.float32)
    moments = jax.ffi.ffi_call(MOMENTS_TARGET, out, vmap_method="sequential")(a, b, shift)
    return moments[0], moments[1]
