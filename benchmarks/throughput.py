"""Train-step and sampler throughput of the model presets on this machine.

    python -m benchmarks.throughput                      # cpu and seed presets
    python -m benchmarks.throughput --presets cpu --train-batch 64

For each preset: parameter count, the first train step's time (compile
included), train images/s (median over timed windows of the jitted
``(state, images) -> (state, metrics)`` step that training uses, batch drawn
inside jit), and the time to draw 100 samples with the preset's T reverse
steps. Where a full sampling run would take too long (``--max-sample-seconds``),
the time is extrapolated from a timed reverse step and marked so.
Writes ``benchmarks/results/throughput-<backend>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.api import DiffusionCheckpoint, _compiled_sampler
from ddpm_jax.configs import get_config
from ddpm_jax.train import count_params, create_train_state, make_dataset_train_step, schedule_from_config


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def bench_train(config, images, windows: int, steps_per_window: int) -> dict:
    state = create_train_state(config)
    step = make_dataset_train_step(config, schedule_from_config(config))
    (state, _), first = _timed(lambda: step(state, images))
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps_per_window):
            state, metrics = step(state, images)
        jax.block_until_ready(metrics["loss"])
        rates.append(steps_per_window * config.train.batch_size / (time.perf_counter() - t0))
    return {
        "params": count_params(state.params),
        "train_batch": config.train.batch_size,
        "first_step_seconds": first,
        "train_images_per_s_median": statistics.median(rates),
        "train_images_per_s_all": rates,
        "state": state,
    }


def bench_sample(config, state, n: int, max_seconds: float) -> dict:
    model = DiffusionCheckpoint.from_train_state(state, config)
    T = config.diffusion.num_timesteps
    # One reverse step costs one forward pass at batch n: time it with a 1-step schedule's worth of work.
    size = config.data.image_size
    from ddpm_jax.models import build_model

    net = build_model(config.model)
    fwd = jax.jit(lambda v, x, t: net.apply(v, x, t, train=False))
    x, t = jnp.zeros((n, size, size, 1)), jnp.zeros((n,), jnp.int32)
    _timed(lambda: fwd(model.variables, x, t))
    per_step = statistics.median(_timed(lambda: fwd(model.variables, x, t))[1] for _ in range(3))
    if per_step * T > max_seconds:
        return {"sample_100_seconds": per_step * T, "sample_extrapolated": True, "forward_seconds_per_step": per_step}
    sampler = _compiled_sampler(json.dumps(model.config.to_dict(), sort_keys=True), n,
                                config.sampling.variance, config.sampling.mean, 0)
    key = jax.random.PRNGKey(0)
    _, with_compile = _timed(lambda: sampler(model.variables, key))
    runs = [_timed(lambda: sampler(model.variables, jax.random.fold_in(key, i)))[1] for i in range(3)]
    return {"sample_100_seconds": statistics.median(runs), "sample_first_call_seconds": with_compile,
            "sample_extrapolated": False, "forward_seconds_per_step": per_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["cpu", "seed"])
    p.add_argument("--train-batch", type=int, default=None,
                   help="batch for the train benchmark (default: the preset's, capped at 128 on CPU)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps-per-window", type=int, default=3)
    p.add_argument("--max-sample-seconds", type=float, default=120.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    backend = jax.default_backend()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, size=(2048, 28, 28, 1), dtype=np.uint8))
    rows = []
    for preset in args.presets:
        config = get_config(preset)
        batch = args.train_batch or (min(config.train.batch_size, 128) if backend == "cpu" else config.train.batch_size)
        config.train.batch_size = batch
        train = bench_train(config, images if batch <= 2048 else jnp.tile(images, (-(-batch // 2048), 1, 1, 1)),
                            args.windows, args.steps_per_window)
        state = train.pop("state")
        samp = bench_sample(config, state, 100, args.max_sample_seconds)
        rows.append({"preset": preset, "T": config.diffusion.num_timesteps, **train, **samp})
        print(f"done {preset}", flush=True)

    print(f"\n{'preset':8} {'params':>11} {'batch':>6} {'1st step s':>10} {'train img/s':>12} {'100 samples s':>14}")
    for r in rows:
        mark = " (est.)" if r["sample_extrapolated"] else ""
        print(f"{r['preset']:8} {r['params']:>11,} {r['train_batch']:>6} {r['first_step_seconds']:>10.1f} "
              f"{r['train_images_per_s_median']:>12.1f} {r['sample_100_seconds']:>14.1f}{mark}")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "rows": rows,
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"throughput-{backend}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
