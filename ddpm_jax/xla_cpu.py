"""XLA CPU settings this project's networks run faster with; applied when ``ddpm_jax`` is imported.

XLA 0.10's CPU backend hands convolutions and matrix products to YNNPACK
fusions by default. For this project's U-Nets its Eigen path is faster on
every measured workload (``python -m benchmarks``, 2 cores, JAX 0.10.2): the
seed preset's train step 123 -> 158 images/s and its sampler 6.2 -> 7.5
samples/s, the cpu preset's sampler 34 -> 49 samples/s, the cpu preset's
train step unchanged. Only the order of floating-point operations changes.

The flag is added to ``XLA_FLAGS`` unless it already names
``xla_cpu_experimental_ynn_fusion_type``, ``DDPM_JAX_KEEP_XLA_FLAGS=1`` is set,
or jaxlib is older than 0.10 (which does not know the flag). XLA reads its
flags when the first device is used, so this takes effect when ``ddpm_jax`` is
imported before any JAX computation (as the command-line tools do); it never
touches GPU settings.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _jaxlib_at_least(major: int, minor: int) -> bool:
    try:
        parts = metadata.version("jaxlib").split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (metadata.PackageNotFoundError, ValueError, IndexError):
        return False


def prefer_eigen_convolutions(environ=os.environ) -> bool:
    """Add :data:`YNN_FLAG` to ``XLA_FLAGS`` where allowed; returns whether it did."""
    flags = environ.get("XLA_FLAGS", "")
    if environ.get("DDPM_JAX_KEEP_XLA_FLAGS") == "1" or "ynn_fusion_type" in flags or not _jaxlib_at_least(0, 10):
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    return True
