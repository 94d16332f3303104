"""Facts about pytrees of arrays (or of their shapes) that several layers report."""

from __future__ import annotations

import jax
import numpy as np


def count_params(params) -> int:
    """The number of scalars in ``params``, a pytree of arrays or of ``jax.ShapeDtypeStruct``; returns it as an int."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
