"""A native CPU kernel for the 3x3 convolution's weight gradient, built on first use.

XLA's CPU backend computes a 3x3 convolution's weight gradient as an Eigen
convolution with an ``(H, W)`` "kernel" behind two layout transposes: 23-70
GFLOP/s on this project's 32x32, 28x28 and 16x16 maps, against 90-140 for
the register-blocked loop in ``conv3x3_weight_grad.cc`` beside this file,
which reads the NHWC buffers in place (``python -m benchmarks.conv_shapes``).
It runs as an XLA FFI custom call on XLA's own intra-op thread pool.

The source is compiled once per machine, compiler and jaxlib, with
``-O3 -march=native``, into ``$DDPM_JAX_CACHE_DIR`` (default
``~/.cache/ddpm_jax``), and loaded from there afterwards. Where no C++
compiler is found or the build fails, :func:`weight_grad_kernel_available`
returns False after one warning that says why, and the layers keep XLA's
gradient (the same sums in another order). ``DDPM_JAX_NATIVE_KERNELS=0``
turns the kernel off without a warning. ``$CXX`` names the compiler
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

SOURCE = Path(__file__).with_name("conv3x3_weight_grad.cc")
TARGET_NAME = "ddpm_jax_conv3x3_weight_grad"
# The kernel's widest vector is 16 floats; output channels must fill whole vectors.
OUT_CHANNEL_MULTIPLE = 16
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> Path:
    if os.environ.get("DDPM_JAX_CACHE_DIR"):
        return Path(os.environ["DDPM_JAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm_jax"


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
    library = _cache_dir() / f"conv3x3_weight_grad-{key.hexdigest()[:16]}.so"
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
def weight_grad_kernel_available() -> bool:
    """Whether the native weight-gradient kernel is built, loaded and registered with XLA (CPU only)."""
    if os.environ.get("DDPM_JAX_NATIVE_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
        return False
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler on the PATH (looked for $CXX, c++, g++, clang++)")
        library = ctypes.CDLL(str(_build(compiler)))
        jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(library.Conv3x3WeightGrad), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"ddpm_jax: the native CPU kernel for convolution weight gradients is not available "
                      f"({str(detail).strip()[-2000:]}); using XLA's, which trains slower on the CPU. "
                      f"Install a C++ compiler or name one in $CXX; DDPM_JAX_NATIVE_KERNELS=0 silences this.",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def weight_grad_kernel_applies(x: jnp.ndarray, dy_channels: int) -> bool:
    """Whether :func:`conv3x3_weight_grad` takes this input ``(B, H, W, C)`` and ``dy_channels``."""
    return (x.ndim == 4 and x.dtype == jnp.float32 and dy_channels % OUT_CHANNEL_MULTIPLE == 0
            and weight_grad_kernel_available())


def conv3x3_weight_grad(x: jnp.ndarray, dy: jnp.ndarray) -> jnp.ndarray:
    """The gradient of ``sum(dy * conv3x3_same(x, kernel))`` with respect to ``kernel`` (HWIO).

    ``x`` ``(B, H, W, C)`` and ``dy`` ``(B, H, W, O)``, float32, ``O`` a multiple of
    :data:`OUT_CHANNEL_MULTIPLE` -> ``(3, 3, C, O)``. Only where
    :func:`weight_grad_kernel_available`.
    """
    if not weight_grad_kernel_available():
        raise RuntimeError("the native weight-gradient kernel is not available here (see the warning above, or "
                           "DDPM_JAX_NATIVE_KERNELS=0); use conv3x3_uses_native_weight_grad() to choose XLA's.")
    chex.assert_rank((x, dy), 4)
    chex.assert_equal_shape_prefix((x, dy), 3)
    kernel_shape = jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET_NAME, kernel_shape, vmap_method="sequential")(x, dy)
