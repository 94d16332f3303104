"""A config in words: the network's widths, a one-line summary, the parameter count, and :class:`Config`,
the ``ConfigDict`` whose repr is that line."""

from __future__ import annotations

import ml_collections

from ddpm_jax.configs.builders import variable_shapes
from ddpm_jax.utils.trees import count_params


def network_shape(model) -> str:
    """The widths of the network a ``model`` section describes; returns e.g. ``'base 16, 2 levels, conv head'``."""
    if model.get("name") == "ddpm_unet":
        return f"{model.base_channels} x {tuple(model.channel_mult)} channels"
    levels = model.get("levels", "?")
    return (f"base {model.get('base_channels', '?')}, {levels} level{'' if levels == 1 else 's'}, "
            f"{model.get('output_head', 'block')} head")


def summary(config) -> str:
    """One line on what a config trains: preset, network, data, schedule and length; returns that text."""
    model, data, train, diffusion = config.model, config.data, config.train, config.diffusion
    classes = int(model.get("num_classes", 0))
    size = int(data.get("image_size", 28))
    return (f"preset {config.get('preset', '?')!r}: {model.get('name', '?')} ({network_shape(model)}"
            f"{f', {classes} classes' if classes else ''}) on "
            f"{config.get('dataset', 'mnist')} {size}x{size}x{int(data.get('channels', 1))}, "
            f"T={diffusion.get('num_timesteps', '?')} {diffusion.get('schedule', '?')}, "
            f"{int(train.get('num_steps', 0)):,} steps at batch {train.get('batch_size', '?')}")


def parameter_count(config) -> int:
    """The number of parameters of the network ``config.model`` describes; returns it without computing any weight."""
    return count_params(variable_shapes(config)["params"])


class Config(ml_collections.ConfigDict):
    """A run's config: an ``ml_collections.ConfigDict`` whose repr is one line (:func:`summary`).

    ``print(config)`` still shows every field, as YAML.
    """

    def __repr__(self) -> str:
        return f"Config({summary(self)}; print() shows every field)"
