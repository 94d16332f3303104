"""Sample grids while a run trains: the same noise, every ``train.sample_every`` steps, turning into digits.

:class:`SampleGrids` is the training loop's :class:`ddpm_jax.training.loop.Hook`: at every
``train.sample_every``-th step it draws ``train.sample_grid_size``² samples of the EMA weights from one fixed
key with ``train.sample_grid_steps`` network calls of the few-step sampler (SDE-DPM-Solver++ on trailing steps;
all T ancestral steps where T is not larger) and writes ``WORKDIR/samples/step_NNNNNN.png``, the ``samples`` image
of TensorBoard (:class:`ddpm_jax.training.tensorboard.EventWriter`) and the seconds it took
(``WORKDIR/samples/grids.json``, compilation included in the first), which the loop leaves out of the
logged images/s.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from ddpm_jax.configs.serialization import config_from_dict
from ddpm_jax.evaluation import plotting
from ddpm_jax.sampling.generate import sample
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.training.loop import Hook
from ddpm_jax.training.tensorboard import EventWriter

SAMPLES_DIR = "samples"
_GRID_STREAM = 0x67726964  # folded into the run's seed: the grids' key, shared by every grid of a run


def grid_path(workdir: str, step: int) -> str:
    """Where the grid of ``step`` is saved: ``WORKDIR/samples/step_NNNNNN.png``."""
    return os.path.join(workdir, SAMPLES_DIR, f"step_{step:06d}.png")


class SampleGrids:
    """Draws and saves a run's grids; ``grids(step, state)`` is one grid from a :class:`TrainState`.

    ``workdir``: the run's folder, whose ``config.json`` (written by training before its first step) says
    what was trained; ``events``: where the grids also go as TensorBoard images (None: PNG files only).
    """

    def __init__(self, workdir: str, events: EventWriter | None = None):
        self.workdir, self.events = workdir, events
        self._config = None

    @staticmethod
    def hook(config, workdir: str, events: EventWriter | None = None) -> Hook:
        """The loop's :class:`Hook` drawing a grid every ``train.sample_every`` steps of ``config``'s run."""
        return Hook(int(config.train.get("sample_every", 0)), SampleGrids(workdir, events))

    def _run_config(self):
        if self._config is None:
            with open(os.path.join(self.workdir, "config.json")) as f:
                self._config = config_from_dict(json.load(f))
        return self._config

    def __call__(self, step: int, state) -> np.ndarray:
        """Draw, save and log the grid of ``state`` (after ``step`` steps); returns its images ``(n, H, W, C)``."""
        config = self._run_config()
        side = int(config.train.get("sample_grid_size", 8))
        calls = int(config.train.get("sample_grid_steps", 25))
        steps = calls if calls < config.diffusion.num_timesteps else None
        checkpoint = DiffusionCheckpoint.from_train_state(state, config)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _GRID_STREAM)
        began = time.perf_counter()
        images = np.asarray(sample(checkpoint, key, side * side, steps=steps, batch_size=side * side))
        seconds = time.perf_counter() - began
        path = grid_path(self.workdir, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plotting.save_grid(images, path, nrow=side)
        if self.events is not None:
            self.events.image("samples", step, plotting.tile(plotting.to_uint8(images), nrow=side))
            self.events.flush()
        self._record(step, seconds)
        return images

    def _record(self, step: int, seconds: float) -> None:
        """Add the grid's time to ``samples/grids.json`` (a rerun of the same step replaces its entry)."""
        path = os.path.join(self.workdir, SAMPLES_DIR, "grids.json")
        grids = {}
        if os.path.exists(path):
            with open(path) as f:
                grids = {int(g["step"]): g for g in json.load(f).get("grids", [])}
        grids[step] = {"step": step, "seconds": round(seconds, 4), "png": os.path.basename(grid_path("", step))}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"grids": [grids[s] for s in sorted(grids)]}, f, indent=1)
        os.replace(tmp, path)
