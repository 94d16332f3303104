"""CPU speed settings for this project's networks: one opt-in call, :func:`configure`.

Importing ``ddpm_jax`` changes nothing in the process. The command-line programs call
:func:`configure` first thing; a notebook or script that wants the same speed calls it
before its first JAX computation::

    import ddpm_jax
    ddpm_jax.cpu.configure()  # before anything runs on a JAX device

It makes three settings, each measured in ``python -m benchmarks`` (the rows named below),
each with an environment variable that leaves it out:

Two flags (:func:`apply_cpu_flags`), each added to ``XLA_FLAGS`` only where it is not named there already:

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
  row "ours, 256-bit vectors" (docs/performance.md, "What each CPU setting buys").

Only the order of floating-point operations changes (tests/paper/test_layers.py
computes the loss and its gradient with and without them and compares). ``DDPM_JAX_KEEP_XLA_FLAGS=1``
adds neither. XLA reads its flags when the first device is used, so they take
effect only when :func:`configure` runs before any JAX computation (as the
command-line tools do); neither flag touches GPU settings.

And one setting of glibc's allocator (:func:`keep_freed_memory`): XLA's CPU
runtime allocates each run's scratch buffer afresh (80 MB for the cpu
preset's train step at batch 64, about 560 MB for the seed preset's at 128)
and frees it at the end. glibc serves every block over 32 MB with a new
``mmap`` and returns it with ``munmap``, so each step touches its scratch
memory for the first time again: one page fault per 4 KiB page, each page
zeroed by the kernel (20,700 faults and 30-50 ms of kernel time per cpu
preset step on a 2-core machine). Told to serve large blocks from its heap,
to let all threads share that heap, and never to hand freed memory back,
glibc gives each step the pages the step before used: no faults, the same
numbers. Measured as alternating processes on a 2-core AMD EPYC (docs/performance.md,
"The process settings"): the cpu preset's train
step 21% faster, the seed preset's 12%; on a 2-core Intel Xeon with the
native kernels, 11% and 4% (where the step is mostly XLA's Eigen
convolutions instead, the settings measure slower). The cost: the
process keeps the memory it frees (its resident size stays at its peak plus
the heap's slack, about two scratch buffers) instead of returning it to the
system. ``DDPM_JAX_KEEP_MALLOC=1`` leaves the allocator alone. Like the flags,
it takes effect only for threads that have not allocated yet, so call
:func:`configure` before any JAX computation; it is skipped where an accelerator
plugin for JAX is installed (unless ``JAX_PLATFORMS=cpu``) and where the C
library is not glibc.

And one choice of JAX's (:func:`unroll_threefry_on_cpu`): on the CPU, JAX lowers its threefry
hash, which draws every random number, as a loop over its five rounds (to compile faster;
every other backend gets the rounds unrolled). XLA runs that loop as a ``while`` thunk per
round with copies of the whole counter arrays between them: in a ``jax.profiler`` trace of
the cpu preset's train step the noise's draw took 3.2 ms of 73. Registered with the unrolled
rounds for the CPU too, the same bits come out (the same hash, only not looped), and the train
step measured 5% faster (alternating processes, 3 rounds, 2-core Intel Xeon). It uses a JAX
internal (the primitive and its generic lowering rule); where a JAX version lacks them nothing
is changed. ``DDPM_JAX_KEEP_RNG_LOWERING=1`` keeps JAX's loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import importlib.util
import os
import platform
import sys
from importlib import metadata

from jax.interpreters import mlir

try:  # a JAX internal: the backends started so far (configure says when it comes too late for them)
    from jax._src import xla_bridge as _xla_bridge
except ImportError:
    _xla_bridge = None
try:  # JAX internals: the threefry primitive and its unrolled lowering (see unroll_threefry_on_cpu)
    from jax._src.random import threefry2x32 as _threefry
except ImportError:
    _threefry = None

__all__ = ["Configured", "configure"]

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


KEEP_MALLOC_ENV = "DDPM_JAX_KEEP_MALLOC"
# mallopt(3)'s parameters (glibc's malloc.h) and the values set: one arena for all threads, no mmap for large
# blocks, and no trimming (-1: "disables trimming completely", mallopt(3)).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_SETTINGS = {
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
}


def runs_on_glibc() -> bool:
    """Whether this process's C library is glibc on Linux, the one whose allocator :func:`keep_freed_memory` sets."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _accelerator_plugin_installed() -> bool:
    """Whether a PJRT plugin (CUDA, ROCm, TPU, ...) is installed for JAX to pick over the CPU."""
    try:
        if any(True for _ in metadata.entry_points(group="jax_plugins")):
            return True
    except Exception:  # a broken distribution's metadata: no reason to fail an import
        pass
    return importlib.util.find_spec("jax_plugins") is not None


def keep_freed_memory(environ=os.environ, libc=None) -> list[str]:
    """Tell glibc's malloc to reuse freed memory instead of unmapping it (see the module docstring).

    Returns the names of the ``mallopt`` settings made: all of :data:`MALLOC_SETTINGS`, or none where
    ``DDPM_JAX_KEEP_MALLOC=1``, where the C library is not glibc, or where an accelerator plugin is installed
    and ``JAX_PLATFORMS`` is not ``cpu``. ``libc``: the C library to call (tests pass a stand-in).
    """
    if environ.get(KEEP_MALLOC_ENV) == "1" or (libc is None and not runs_on_glibc()):
        return []
    # The plugin look-up reads every installed distribution's entry points (about 10 ms): after the cheap checks.
    if environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu" and _accelerator_plugin_installed():
        return []
    if libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    made = []
    for name, (param, value) in MALLOC_SETTINGS.items():
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:  # mallopt returns 1 on success
            made.append(name)
    return made


KEEP_RNG_LOWERING_ENV = "DDPM_JAX_KEEP_RNG_LOWERING"


def unroll_threefry_on_cpu(environ=os.environ) -> bool:
    """Lower JAX's threefry hash on the CPU with its rounds unrolled, as JAX does on other backends.

    The same random bits either way (the module docstring says why it pays). Returns whether the
    lowering was registered: not where ``DDPM_JAX_KEEP_RNG_LOWERING=1``, nor where this JAX version
    lacks the internals it names. Call before the first random draw is compiled.
    """
    if environ.get(KEEP_RNG_LOWERING_ENV) == "1":
        return False
    primitive = getattr(_threefry, "threefry2x32_p", None)
    unrolled = getattr(_threefry, "_threefry2x32_lowering_rule", None)
    if primitive is None or unrolled is None:
        return False
    mlir.register_lowering(primitive, unrolled, platform="cpu", inline=False)
    return True


@dataclasses.dataclass(frozen=True)
class Configured:
    """What :func:`configure` set: the XLA flags added, the ``mallopt`` settings made, whether the RNG lowering was registered."""

    xla_flags: tuple[str, ...]
    malloc: tuple[str, ...]
    rng_lowering: bool
    late: bool  # JAX had started a backend before the call: the flags and the allocator setting come too late

    def __str__(self) -> str:
        parts = [f"XLA flags {' '.join(self.xla_flags) or 'none'}", f"malloc {', '.join(self.malloc) or 'unchanged'}",
                 f"threefry {'unrolled' if self.rng_lowering else 'looped'}"]
        return "CPU settings: " + "; ".join(parts) + (" (JAX had already started: flags apply to new processes only)"
                                                       if self.late else "")


def _backend_started() -> bool:
    return bool(getattr(_xla_bridge, "_backends", None))


def configure(environ=os.environ) -> Configured:
    """Apply this module's three CPU speed settings to the running process; returns what was set.

    Call it before the first JAX computation: XLA reads its flags, and glibc's allocator takes its settings,
    when the first device starts. Each setting has its opt-out (``DDPM_JAX_KEEP_XLA_FLAGS=1``,
    ``DDPM_JAX_KEEP_MALLOC=1``, ``DDPM_JAX_KEEP_RNG_LOWERING=1``); none touches a GPU. Calling it twice
    adds nothing the second time. ``environ``: the environment to read and to add ``XLA_FLAGS`` to.
    """
    late = _backend_started()
    flags = apply_cpu_flags(environ)
    malloc = keep_freed_memory(environ)
    rng = unroll_threefry_on_cpu(environ)
    return Configured(tuple(flags), tuple(malloc), rng, late)
