"""XLA CPU settings this project's networks run faster with; applied when ``ddpm_jax`` is imported.

Two flags, each added to ``XLA_FLAGS`` only where it is not named there already:

- :data:`YNN_FLAG`: XLA 0.10's CPU backend hands convolutions and matrix
  products to YNNPACK fusions by default. For this project's U-Nets its Eigen
  path is faster on every measured workload (``python -m benchmarks``, 2
  cores, JAX 0.10.2): the seed preset's train step 123 -> 158 images/s and its
  sampler 6.2 -> 7.5 samples/s, the cpu preset's sampler 34 -> 49 samples/s,
  the cpu preset's train step unchanged. Added for jaxlib 0.10 and later
  (older ones do not know the flag and would abort).
- :data:`VECTOR_FLAG`, on a processor with AVX-512 only: XLA emits its own
  fused loops (BatchNorm, LeakyReLU, the optimizer's update, the layout
  copies: most of a small U-Net's step that is not a convolution) for 256-bit
  vectors unless told to use 512. Measured in ``python -m benchmarks`` as the
  row "ours, 256-bit vectors" (README, "Speed: ours against the PyTorch peers").

Only the order of floating-point operations changes (tests/paper/test_layers.py
computes the loss and its gradient with and without them and compares). ``DDPM_JAX_KEEP_XLA_FLAGS=1``
adds neither. XLA reads its flags when the first device is used, so this takes
effect when ``ddpm_jax`` is imported before any JAX computation (as the
command-line tools do); neither flag touches GPU settings.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
VECTOR_FLAG = "--xla_cpu_prefer_vector_width=512"


def _jaxlib_at_least(major: int, minor: int) -> bool:
    try:
        parts = metadata.version("jaxlib").split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (metadata.PackageNotFoundError, ValueError, IndexError):
        return False


def has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this processor has AVX-512 (its ``avx512f`` flag; False where ``cpuinfo`` cannot be read)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":  # whole words: "avx512fp16" alone is not "avx512f"
                    return "avx512f" in value.split()
    except OSError:
        pass
    return False


def apply_cpu_flags(environ=os.environ, avx512: bool | None = None) -> list[str]:
    """Add :data:`YNN_FLAG` and (with AVX-512) :data:`VECTOR_FLAG` to ``XLA_FLAGS`` where allowed; returns those added.

    A flag whose name ``XLA_FLAGS`` already holds is the user's choice and is left alone.
    """
    flags = environ.get("XLA_FLAGS", "")
    if environ.get("DDPM_JAX_KEEP_XLA_FLAGS") == "1":
        return []
    added = []
    if "ynn_fusion_type" not in flags and _jaxlib_at_least(0, 10):
        added.append(YNN_FLAG)
    if "prefer_vector_width" not in flags and (has_avx512() if avx512 is None else avx512):
        added.append(VECTOR_FLAG)
    if added:
        environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added
