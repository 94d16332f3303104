"""The figures of a trained run: the report's sample grid and reverse-process strip, drawn from a checkpoint.

Called by ``ddpm-jax-train`` (:mod:`ddpm_jax.cli.train`) once a run has reached its last step (and by
anyone holding a :class:`ddpm_jax.DiffusionCheckpoint`); training itself draws nothing.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from ddpm_jax.configs import figure_grid_size
from ddpm_jax.evaluation import plotting
from ddpm_jax.sampling.generate import sample
from ddpm_jax.training.checkpoint import DiffusionCheckpoint


def write_figures(checkpoint: DiffusionCheckpoint, workdir: str, progress: bool = False) -> dict:
    """Draw a run's figures into ``workdir``; returns what ``sampling.json`` records (how long the grid took).

    The figures: ``samples.png`` (the report's Figure 4), ``reverse_process.png`` (its Figure 5) and,
    for a class-conditional network, ``samples_by_class.png``, one row per class.

    The grid is ``sampling.grid_size`` on a side, smaller for a short run
    (:func:`ddpm_jax.configs.figure_grid_size`: at most ``sampling.figure_share`` of the training's
    network evaluations). ``checkpoint`` is a :class:`ddpm_jax.DiffusionCheckpoint`; the samples use
    the key ``PRNGKey(config.seed + 1)``, so the figures are reproducible. They
    use the checkpoint's EMA weights; ``samples_raw.png`` is the same grid (same
    noise) from the last step's raw weights, to show what the average buys.
    """
    config = checkpoint.config
    grid_key, strip_key = jax.random.split(jax.random.PRNGKey(config.seed + 1))
    side = figure_grid_size(config)  # sampling.grid_size, smaller for a short run (sampling.figure_share)
    n_grid = side**2
    t0 = time.perf_counter()
    grid = np.asarray(sample(checkpoint, grid_key, n_grid, progress=progress))
    seconds = time.perf_counter() - t0
    plotting.save_grid(grid, os.path.join(workdir, "samples.png"), nrow=side)
    if checkpoint.weights_used == "ema":
        raw = np.asarray(sample(checkpoint, grid_key, n_grid, weights="raw"))
        plotting.save_grid(raw, os.path.join(workdir, "samples_raw.png"), nrow=side)
    _, frames = sample(checkpoint, strip_key, config.sampling.strip_samples, return_every=config.sampling.strip_every)
    plotting.save_reverse_process(
        np.asarray(frames),
        os.path.join(workdir, "reverse_process.png"),
        num_timesteps=config.diffusion.num_timesteps,
        every=config.sampling.strip_every,
    )
    info = {"num_samples": n_grid, "seconds_including_compile": seconds, "step": checkpoint.step,
            "weights": checkpoint.weights_used}
    with open(os.path.join(workdir, "sampling.json"), "w") as f:
        json.dump(info, f, indent=2)
    num_classes = int(config.model.get("num_classes", 0))
    if num_classes:  # one row per class, chosen rather than cherry-picked, at the config's guidance scale
        digits = np.repeat(np.arange(num_classes), side)
        by_class = np.asarray(sample(checkpoint, grid_key, len(digits), labels=digits))
        plotting.save_grid(by_class, os.path.join(workdir, "samples_by_class.png"), nrow=side)
        info["guidance_scale"] = float(config.sampling.guidance_scale)
    also = " (EMA weights; samples_raw.png: the raw weights)" if checkpoint.weights_used == "ema" else ""
    if num_classes:
        drawn = ("labels drawn at the training label frequencies" if config.sampling.get("unconditional", "null")
                 == "label_prior" else "unconditional: the null label")
        also += (f"; samples.png: {drawn}; samples_by_class.png: one row per class "
                 f"(classifier-free guidance w={config.sampling.guidance_scale:g})")
    print(f"wrote {workdir}/samples.png and reverse_process.png{also} ({n_grid} samples in {seconds:.1f} s)",
          flush=True)
    return info
