"""The CPU speed work, behind one door: the process settings (:func:`configure`, opt-in), the native kernels
(:mod:`ddpm_jax.cpu.kernels`) and the fast convolution and normalization layers built on them
(:mod:`ddpm_jax.cpu.layers`), which the model builder hands to a network on a CPU. The networks themselves
never mention the CPU.

Importing this package imports no JAX: :func:`configure` must be able to run before the first JAX computation."""

from __future__ import annotations

from ddpm_jax.cpu.settings import (  # noqa: F401
    KEEP_MALLOC_ENV,
    KEEP_RNG_LOWERING_ENV,
    MALLOC_SETTINGS,
    VECTOR_FLAG,
    YNN_FLAG,
    Configured,
    apply_cpu_flags,
    configure,
    has_avx512,
    keep_freed_memory,
    runs_on_glibc,
    unroll_threefry_on_cpu,
)

__all__ = ['Configured', 'KEEP_MALLOC_ENV', 'KEEP_RNG_LOWERING_ENV', 'MALLOC_SETTINGS', 'VECTOR_FLAG', 'YNN_FLAG', 'apply_cpu_flags', 'configure', 'has_avx512', 'keep_freed_memory', 'runs_on_glibc', 'unroll_threefry_on_cpu']
