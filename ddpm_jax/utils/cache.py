"""Where the package caches what it makes once and reuses: one folder, one environment variable.

``$DDPM_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/ddpm_jax``, else ``~/.cache/ddpm_jax``. Inside it:
the feature classifiers of the evaluation and their reference features (:mod:`ddpm_jax.evaluation.feature_network`,
:mod:`ddpm_jax.evaluation.evaluate`), the compiled native CPU kernels (:mod:`ddpm_jax.cpu.kernels`) and,
where a program opts in, JAX's compilation cache (``xla/``). Everything there can be deleted; it is
made again when next needed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

CACHE_ENV = "DDPM_JAX_CACHE_DIR"
_OLD_ENV = "DDPM_JAX_CACHE"  # the feature cache's own variable once; read no more


def cache_dir(environ=os.environ) -> Path:
    """The package's cache folder; returns ``$DDPM_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddpm_jax`` or ``~/.cache/ddpm_jax``."""
    if environ.get(_OLD_ENV) and not environ.get(CACHE_ENV):
        warnings.warn(f"${_OLD_ENV} is no longer read; set ${CACHE_ENV}={environ[_OLD_ENV]} to keep that cache.",
                      stacklevel=2)
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm_jax"
