"""The presets: one module each, whose ``get_config()`` starts from :mod:`ddpm_jax.configs.default` (or from
the preset it extends) and overrides only what differs.

* ``cpu``: the default on a machine without a GPU: the ``quick`` network, class-conditional, 9,000 steps,
  guided at w = 0.5 (about 18 minutes on 2 CPU cores);
* ``gpu``: the default where JAX sees a GPU: the ``seed`` network, class-conditional with a convolutional
  head, 5,000 steps at batch 1000 (about 2 minutes on one H200);
* ``quick``: the report's U-Net shrunk to 16 base channels and 2 levels, 3,000 steps (about 6 minutes);
* ``seed``: the report's setup (its 12,552,848-parameter U-Net, 2000 epochs; a GPU run);
* ``ddpm``: ``quick`` with Ho et al.'s U-Net;
* ``cifar10``: Ho et al.'s CIFAR-10 setup (a GPU run);
* ``tiny``: a few-second smoke test for tests and CI.

:func:`preset_table` gives each one's defaults (the README's table).
"""

from __future__ import annotations

from ddpm_jax.configs.describe import Config, network_shape, parameter_count
from ddpm_jax.configs.presets import cifar10, cpu, ddpm, gpu, quick, seed, tiny

# Preset name -> its module, in the order PRESETS (and the README's table) lists them.
_MODULES = {"cpu": cpu, "gpu": gpu, "quick": quick, "seed": seed, "ddpm": ddpm, "cifar10": cifar10, "tiny": tiny}
PRESETS: tuple[str, ...] = tuple(_MODULES)


def get_config(preset: str = "cpu") -> Config:
    """A preset's config; returns a fresh :class:`~ddpm_jax.configs.Config` for ``preset`` (one of :data:`PRESETS`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}.")
    return Config(_MODULES[preset].get_config())


def preset_table() -> str:
    """The presets' defaults as a Markdown table (the README's, checked by a test); returns the table's text."""
    rows = ["| preset | network | parameters | data | diffusion | batch | steps | learning rate | classes, guidance w |",
            "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for preset in PRESETS:
        c = get_config(preset)
        size, classes = int(c.data.image_size), int(c.model.num_classes)
        rows.append(
            f"| `{preset}` | `{c.model.name}`, {network_shape(c.model)} | {parameter_count(c):,} | {c.dataset} at {size}x{size} | "
            f"{c.diffusion.schedule}, T={c.diffusion.num_timesteps} | {c.train.batch_size:,} | {c.train.num_steps:,} | "
            f"{c.train.learning_rate:g} | {f'{classes}, w = {c.sampling.guidance_scale:g}' if classes else 'none'} |")
    return "\n".join(rows)
