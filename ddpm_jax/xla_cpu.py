"""CPU settings this project's networks run faster with: XLA flags (applied when ``ddpm_jax`` is imported)
and glibc's allocator (applied by the command-line tools when they start).

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

The allocator (:func:`relaunch_with_malloc_tunables`): XLA's CPU runtime
allocates every step's temporary buffer afresh (391 MB for the seed preset's
train step at batch 128, 62 MB for the cpu preset's at batch 64) and frees it
after the step. glibc serves any block over 32 MB with a fresh ``mmap`` and
returns it on ``free``, so every step page-faults its whole scratch space in
again: 100,000 faults and 0.25 s of kernel time per seed step, 16,000 faults
per cpu-preset step (``resource.getrusage``). :data:`MALLOC_TUNABLES` make
glibc keep freed memory for reuse instead (one arena, no ``mmap``, no trimming;
transparent huge pages where the kernel allows them on request). They take
effect only when a process starts, so the command-line tools re-execute
themselves once with them; ``DDPM_JAX_KEEP_MALLOC=1`` (or ``GLIBC_TUNABLES`` or
``MALLOC_*`` settings of your own) leaves the allocator alone. Only where
memory comes from changes, so results are bit-identical; the price is that a
process keeps its peak memory until it exits. Measured in ``python -m benchmarks``
as the rows "ours, glibc's default allocator".
"""

from __future__ import annotations

import os
import platform
import sys
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


# One arena (so that XLA's worker threads allocate from the heap too: other arenas serve a block this large only
# through mmap), no mmap, no returning freed memory to the system; huge pages for the heap where the kernel's
# transparent huge pages are 'madvise' (glibc 2.35 and later; older ones ignore a tunable they do not know).
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=1099511627776:glibc.malloc.hugetlb=1")
KEEP_MALLOC = "DDPM_JAX_KEEP_MALLOC"
# glibc's own environment variables for the same settings: set, they are the user's choice.
_MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                     "MALLOC_TOP_PAD_")


def malloc_relaunch_environment(environ=os.environ, system: str | None = None,
                                libc: str | None = None) -> dict[str, str] | None:
    """The environment to restart this process with (``environ`` plus :data:`MALLOC_TUNABLES`), or None.

    None where the allocator is not glibc's on Linux, where ``DDPM_JAX_KEEP_MALLOC=1``, and where
    ``GLIBC_TUNABLES`` already names a ``glibc.malloc`` tunable or a ``MALLOC_*`` variable is set
    (the user's settings, or ours after the restart: so a process restarts at most once).
    """
    if environ.get(KEEP_MALLOC) == "1":
        return None
    system = sys.platform if system is None else system
    libc = platform.libc_ver()[0] if libc is None else libc
    if system != "linux" or libc != "glibc":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or any(name in environ for name in _MALLOC_VARIABLES):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, MALLOC_TUNABLES)))}


def relaunch_with_malloc_tunables(argv: list[str] | None = None) -> None:
    """Re-execute this process (same interpreter, same command line: ``sys.orig_argv``) with
    :data:`MALLOC_TUNABLES`; returns only where :func:`malloc_relaunch_environment` says not to.

    For a command-line tool's ``__main__`` block, before its first JAX computation: the
    process id stays the same (``exec``), and so do its standard streams.
    """
    environment = malloc_relaunch_environment()
    if environment is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment)
