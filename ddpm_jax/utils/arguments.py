"""Checks of the arguments public functions take, each with one message that names the value and what is allowed."""

from __future__ import annotations

import jax
import numpy as np


def check_count(name: str, value, least: int) -> int:
    """``value`` as an int if it is an integer >= ``least`` (Python's, numpy's, or a 0-d integer array, JAX's
    too; never a bool); else ValueError naming ``name`` and the value."""
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and np.issubdtype(value.dtype, np.integer):
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
        shown = repr(value) if len(repr(value)) <= 60 else f"{type(value).__name__} {repr(value)[:40]}..."
        raise ValueError(f"{name} must be an integer >= {least}, got {shown}.")
    return int(value)


def check_key(key, name: str = "key") -> jax.Array:
    """``key`` if it is a JAX PRNG key (``jax.random.key(0)``, or the raw uint32 ``(2,)`` of
    ``jax.random.PRNGKey(0)``); else TypeError naming ``name`` and how to make one."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    if not (typed or raw):
        shown = f"{type(key).__name__}" + (f" {key!r}" if isinstance(key, (int, float, str)) else
                                           f" of shape {getattr(key, 'shape', '?')}")
        raise TypeError(f"{name} must be a JAX PRNG key, e.g. jax.random.PRNGKey(0) or jax.random.key(0); "
                        f"got {shown}.")
    return key
