"""What the sample grids during training cost a default run: ``python -m benchmarks.sample_grid_cost``.

Trains the ``cpu`` preset (or ``--preset``) through the real program path, ``train_and_evaluate`` with the
:class:`ddpm_jax.evaluation.previews.SampleGrids` hook and TensorBoard events on, for ``--steps`` steps with a
grid every ``--every`` steps (denser than the preset's, to time several), on random images of the preset's
shape (the speed does not depend on the pixels). It reads back the training's own speed (``metrics.jsonl``'s
images/s, which leaves the grids out; the first line, with compilation, dropped) and each grid's seconds
(``samples/grids.json``: the first includes compiling the sampler), and projects the share of a whole default
run that its grids take: ``(first + (G - 1) * median grid) / (run + grids)`` with G = ``num_steps //
sample_every`` grids. Also the share measured directly over the benchmark's own span (wall clock of the loop).
Run it alone on the machine. Writes ``benchmarks/results/sample-grid-cost-<backend>-<preset>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

import ddpm_jax  # noqa: E402

ddpm_jax.cpu.configure()  # ddpm_jax/cpu/settings.py's settings, as the command-line programs make them
from ddpm_jax.configs import get_config
from ddpm_jax.evaluation.previews import SampleGrids
from ddpm_jax.training.tensorboard import open_events
from ddpm_jax.training.train import train_and_evaluate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sample_grid_cost", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", help="the run to cost (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600, help="training steps timed (default: %(default)s)")
    p.add_argument("--every", type=int, default=100, help="a grid every this many steps (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/sample-grid-cost-...json)")
    return p.parse_args(argv)


def measure(preset: str, steps: int, every: int, workdir: str) -> dict:
    """Train ``steps`` steps of ``preset`` with a grid every ``every`` in ``workdir``; returns the timings."""
    config = get_config(preset)
    default_every, num_steps = int(config.train.sample_every), int(config.train.num_steps)
    config.train.sample_every = every
    size = int(config.data.native_size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10_000, size, size, int(config.data.channels)), dtype=np.uint8)
    labels = rng.integers(0, 10, (10_000,)).astype(np.int32) if config.model.num_classes else None
    events = open_events(workdir, config)
    hooks = (SampleGrids.hook(config, workdir, events),)
    began = time.perf_counter()
    train_and_evaluate(config, workdir, images=images, labels=labels, progress=False, stop_at=steps, hooks=hooks,
                       events=events)
    wall = time.perf_counter() - began
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    with open(os.path.join(workdir, "samples", "grids.json")) as f:
        grids = [g["seconds"] for g in json.load(f)["grids"]]
    rates = [r["images_per_s"] for r in lines[1:] if r.get("images_per_s")]
    step_seconds = config.train.batch_size / statistics.median(rates)
    first, later = grids[0], statistics.median(grids[1:])
    count = num_steps // default_every if default_every else 0
    run_seconds = num_steps * step_seconds
    grid_seconds = first + (count - 1) * later if count else 0.0
    return {
        "preset": preset, "steps_timed": steps, "grid_every_timed": every, "grid_images": int(
            config.train.sample_grid_size) ** 2,
        "train_step_seconds_median": step_seconds, "train_images_per_s_median": statistics.median(rates),
        "grid_seconds": grids, "first_grid_seconds": first, "grid_seconds_median_after_first": later,
        "default_run": {"num_steps": num_steps, "sample_every": default_every, "grids": count,
                        "train_seconds": run_seconds, "grid_seconds": grid_seconds,
                        "grid_share": grid_seconds / (run_seconds + grid_seconds)},
        "measured_span": {"wall_seconds": wall, "grid_seconds": sum(grids), "grid_share": sum(grids) / wall},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="grid_cost_") as workdir:
        result = measure(args.preset, args.steps, args.every, os.path.join(workdir, "run"))
    result.update({"backend": jax.default_backend(), "processor": platform.processor() or platform.machine(),
                   "cores": os.cpu_count(), "jax": jax.__version__, "date": datetime.date.today().isoformat()})
    d = result["default_run"]
    print(f"| {args.preset} preset | value |\n| --- | --- |")
    print(f"| train step (median) | {result['train_step_seconds_median'] * 1e3:.1f} ms "
          f"({result['train_images_per_s_median']:.0f} images/s) |")
    print(f"| grid of {result['grid_images']} samples | first {result['first_grid_seconds']:.1f} s (compiles the "
          f"sampler), then {result['grid_seconds_median_after_first']:.2f} s (median) |")
    print(f"| default run: {d['num_steps']:,} steps, a grid every {d['sample_every']:,} | {d['grids']} grids, "
          f"{d['grid_seconds']:.0f} s of {d['train_seconds'] + d['grid_seconds']:.0f} s: **{d['grid_share']:.1%}** |")
    print(f"| this benchmark's span ({args.steps} steps, a grid every {args.every}) | "
          f"{result['measured_span']['grid_share']:.1%} of {result['measured_span']['wall_seconds']:.0f} s |")
    out = args.out or os.path.join(RESULTS, f"sample-grid-cost-{result['backend']}-{args.preset}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
