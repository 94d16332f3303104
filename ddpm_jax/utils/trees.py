"""Facts about pytrees of arrays (or of their shapes) that several layers report, and paths into nested dicts."""

from __future__ import annotations

import jax
import numpy as np


def count_params(params) -> int:
    """The number of scalars in ``params``, a pytree of arrays or of ``jax.ShapeDtypeStruct``; returns it as an int."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def get_path(tree, path: tuple[str, ...]):
    """``tree[path[0]][path[1]]...``: the node at ``path`` of nested dicts (KeyError names the missing key)."""
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """Put ``value`` at ``path`` of nested dicts, making the dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value
