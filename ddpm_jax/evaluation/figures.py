"""The figures of a trained run: the report's sample grid and reverse-process strip, drawn from a checkpoint,
and its loss curves (``loss.png``), drawn from its ``metrics.jsonl``.

Called by ``ddpm-jax-train`` (:mod:`ddpm_jax.cli.train`) once a run has reached its last step (and by
anyone holding a :class:`ddpm_jax.DiffusionCheckpoint`); during training only the grids of
:mod:`ddpm_jax.evaluation.previews` are drawn.
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
from ddpm_jax.training.loop import NUM_QUARTERS, timestep_quarters

CURVES = ("loss",) + tuple(f"loss_t_q{q}" for q in range(NUM_QUARTERS)) + ("learning_rate",)


def loss_curves(workdir: str) -> dict:
    """A run's logged curves against the training images seen: ``{"images": (L,), "loss": (L,), "loss_t_q0"..
    "loss_t_q3": (L,), "learning_rate": (L,)}`` float64 from ``WORKDIR/metrics.jsonl`` (NaN where a line has
    none), and ``"quarters"``, the quarters' names from ``WORKDIR/config.json`` (``'t in 0..24'``; 0-based t).

    FileNotFoundError names the missing file (a folder that holds no run).
    """
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])  # a resumed run's last word
    nan = float("nan")
    curves = {"images": np.array([r["step"] * config["train"]["batch_size"] for r in records], dtype=np.float64)}
    for field in CURVES:
        curves[field] = np.array([nan if r.get(field) is None else r[field] for r in records], dtype=np.float64)
    curves["quarters"] = [f"t in {lo}..{hi - 1}" for lo, hi in timestep_quarters(config["diffusion"]["num_timesteps"])]
    return curves


def write_loss_plot(runs: dict[str, str], path: str) -> str:
    """Draw the loss curves of runs (label -> workdir) on one figure (:func:`plotting.save_loss_curves`);
    returns ``path``. The quarters are named by their timesteps where every run has the same T."""
    curves = {label: loss_curves(workdir) for label, workdir in runs.items()}
    names = {tuple(c["quarters"]) for c in curves.values()}
    quarters = list(names.pop()) if len(names) == 1 else [f"quarter {q + 1} of t" for q in range(NUM_QUARTERS)]
    plotting.save_loss_curves(curves, path, quarters)
    return path


def write_figures(checkpoint: DiffusionCheckpoint, workdir: str, progress: bool = False) -> dict:
    """Draw a run's figures into ``workdir``; returns what ``sampling.json`` records (how long the grid took).

    The figures: ``samples.png`` (the report's Figure 4), ``reverse_process.png`` (its Figure 5),
    ``loss.png`` (the logged loss and its quarters of t against the images seen, where ``metrics.jsonl``
    exists) and, for a class-conditional network, ``samples_by_class.png``, one row per class.

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
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        write_loss_plot({os.path.basename(os.path.normpath(workdir)): workdir}, os.path.join(workdir, "loss.png"))
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
    print(f"wrote {workdir}/samples.png, reverse_process.png and loss.png{also} ({n_grid} samples in {seconds:.1f} s)",
          flush=True)
    return info
