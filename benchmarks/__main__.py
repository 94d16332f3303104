"""The benchmark suite: ours and the PyTorch peers on the same work, side by side, in one run.

    python -m benchmarks                 # everything (about 10 minutes on 2 CPU cores)
    python -m benchmarks --quick         # fewer timed steps, for a smoke test

Every measurement runs in a fresh process (``benchmarks.ours`` /
``benchmarks.peers``) so compile caches, thread pools and peak memory do not
leak between them. Rows:

- ``ours``: our jitted train step and sampler as shipped (``conv_impl='auto'``, and
  the XLA flag of ``ddpm_jax/xla_cpu.py``);
- ``ours, YNN fusions``: the same without that flag (``DDPM_JAX_KEEP_XLA_FLAGS=1``);
- ``ours, before``: every convolution left to XLA (``conv_impl='xla'``) and no flag,
  i.e. the code before the CPU work of issue 4;
- ``torch port``: the report's U-Net in plain PyTorch (``benchmarks/peers.py``), same work;
- ``diffusers``: ``UNet2DModel`` of about the same size with ``DDPMScheduler``'s loop (seed size only).

And few-step sampling (``sample10``): 100 samples in 10 reverse steps, ours with DDIM
over 10 of the 100 training steps, the torch port's loop over 10 steps, diffusers'
``DDIMScheduler`` with 10 inference steps.

Train: images/s (median over timed steps), first step (compile) seconds, and
the share of the machine's float32 matmul peak (numpy GEMM, measured here)
that XLA's FLOP count of our step implies. Sampling: samples/s for 100 images
with T = 100 reverse steps. Ratios are ours / peer. Writes
``benchmarks/results/suite-<backend>.json`` and prints the tables.
Needs the ``bench`` extra: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FEW_STEPS = 10  # reverse steps of the few-step samplers' rows

# Per preset: the peer's model flags (the same network as ours) and the train batch on the CPU.
PRESETS = {
    "seed": {"peer": ["--base-channels", "32", "--levels", "4", "--output-head", "block", "--image-size", "32"],
             "batch": 128},
    "cpu": {"peer": ["--base-channels", "16", "--levels", "2", "--output-head", "conv", "--image-size", "28"],
            "batch": 64},
}


def matmul_peak_gflops(size: int = 2048, repeats: int = 7) -> float:
    """float32 GEMM throughput of this machine through numpy's BLAS: the ceiling any network can reach."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def run(module: str, args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``python -m module args`` in a fresh process; its last stdout line is a JSON result."""
    cmd = [sys.executable, "-m", module, *args]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(cmd)}
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "cmd": " ".join(cmd)}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"cmd": " ".join(cmd), "process_seconds": wall})
    return result


# Our rows: the code as shipped, without the XLA flag of ddpm_jax/xla_cpu.py, and before issue 4's CPU work.
KEEP_FLAGS = {"DDPM_JAX_KEEP_XLA_FLAGS": "1"}
LABELS = ("ours", "ours, YNN fusions", "ours, before", "torch port", "diffusers")


def plan(quick: bool) -> list[tuple[str, str, str, str, list[str], dict]]:
    """(preset, task, label, module, args, extra environment) for every measurement."""
    steps = "3" if quick else "5"
    jobs = []
    for preset, p in PRESETS.items():
        batch = str(p["batch"])
        slow_before = preset == "seed"  # XLA's 2x2 convolutions: seconds per step
        ours = ["--preset", preset]
        jobs += [
            (preset, "train", "ours", "benchmarks.ours", ["train", *ours, "--batch", batch, "--steps", steps], {}),
            (preset, "train", "ours, YNN fusions", "benchmarks.ours",
             ["train", *ours, "--batch", batch, "--steps", steps], KEEP_FLAGS),
            (preset, "train", "ours, before", "benchmarks.ours",
             ["train", *ours, "--conv-impl", "xla", "--batch", batch, "--steps", "2" if slow_before else steps],
             KEEP_FLAGS),
            (preset, "train", "torch port", "benchmarks.peers",
             ["torch-train", *p["peer"], "--batch", batch, "--steps", steps, "--json"], {}),
            (preset, "sample", "ours", "benchmarks.ours", ["sample", *ours, "--n", "100"], {}),
            (preset, "sample", "ours, YNN fusions", "benchmarks.ours", ["sample", *ours, "--n", "100"], KEEP_FLAGS),
            (preset, "sample", "ours, before", "benchmarks.ours",
             ["sample", *ours, "--conv-impl", "xla", "--n", "100"] + (["--steps-to-time", "3"] if slow_before else []),
             KEEP_FLAGS),
            (preset, "sample", "torch port", "benchmarks.peers",
             ["torch-sample", *p["peer"], "--n", "100", "--json"] + (["--steps-to-time", "20"] if quick else []), {}),
            # Few-step sampling: our DDIM over 10 of the 100 steps; the torch port's loop over 10 steps (a
            # DDIM step adds a few elementwise operations to the same network call).
            (preset, "sample10", "ours", "benchmarks.ours",
             ["sample", *ours, "--n", "100", "--sample-steps", str(FEW_STEPS), "--method", "ddim"], {}),
            (preset, "sample10", "torch port", "benchmarks.peers",
             ["torch-sample", *p["peer"], "--n", "100", "--num-timesteps", str(FEW_STEPS), "--json"], {}),
        ]
        if preset == "seed":
            jobs += [
                (preset, "train", "diffusers", "benchmarks.peers",
                 ["diffusers-train", "--batch", batch, "--steps", steps, "--json"], {}),
                (preset, "sample", "diffusers", "benchmarks.peers",
                 ["diffusers-sample", "--n", "100", "--steps-to-time", "10" if quick else "25", "--json"], {}),
                (preset, "sample10", "diffusers", "benchmarks.peers",
                 ["diffusers-sample", "--n", "100", "--inference-steps", str(FEW_STEPS), "--json"], {}),
            ]
    return jobs


def _versions() -> dict:
    versions = {}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def print_tables(rows: list[dict], peak: float) -> None:
    for preset in PRESETS:
        train = {r["label"]: r for r in rows if r["preset"] == preset and r["task"] == "train"}
        sample = {r["label"]: r for r in rows if r["preset"] == preset and r["task"] == "sample"}
        flops = (train.get("ours") or {}).get("flops_per_image")
        print(f"\n{preset} preset: train step (batch {PRESETS[preset]['batch']}) and 100 samples x 100 steps")
        print(f"{'':18} {'train img/s':>11} {'ours/this':>9} {'1st step s':>10} {'peak share':>10} "
              f"{'samples/s':>10} {'ours/this':>9} {'peak RSS MB':>11}")
        ours_train = (train.get("ours") or {}).get("train_images_per_s")
        ours_sample = (sample.get("ours") or {}).get("samples_per_s")
        for label in LABELS:
            t, s = train.get(label), sample.get(label)
            if t is None and s is None:
                continue
            t, s = t or {}, s or {}
            ips, sps = t.get("train_images_per_s"), s.get("samples_per_s")
            share = ips * flops / 1e9 / peak if ips and flops and label != "diffusers" else None
            cells = [
                f"{ips:11.1f}" if ips else f"{t.get('error', '-')[:11]:>11}",
                f"{ours_train / ips:9.2f}" if ips and ours_train else f"{'-':>9}",
                f"{t['first_step_seconds']:10.1f}" if t.get("first_step_seconds") else f"{'-':>10}",
                f"{share:10.0%}" if share else f"{'-':>10}",
                (f"{sps:9.2f}" + ("*" if s.get("extrapolated") else " ")) if sps else f"{s.get('error', '-')[:10]:>10}",
                f"{ours_sample / sps:9.2f}" if sps and ours_sample else f"{'-':>9}",
                f"{max(t.get('peak_rss_mb', 0), s.get('peak_rss_mb', 0)):11.0f}",
            ]
            print(f"{label:18} " + " ".join(cells))
        few = {r["label"]: r for r in rows if r["preset"] == preset and r["task"] == "sample10"}
        ours_few = (few.get("ours") or {}).get("samples_per_s")
        if few:
            print(f"{preset} preset, few-step sampling: 100 samples in {FEW_STEPS} steps "
                  "(ours: DDIM eta=0; torch port: its loop over 10 steps; diffusers: DDIMScheduler)")
            for label, r in few.items():
                sps = r.get("samples_per_s")
                print(f"{label:18} {f'{sps:10.2f}' if sps else r.get('error', '-')[:10]:>10} "
                      f"{f'{ours_few / sps:9.2f}' if sps and ours_few else '-':>9}")
    print("\n* extrapolated from timed reverse steps (or forward passes) to all 100 steps.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps, extrapolated sampling")
    p.add_argument("--only", nargs="+", choices=tuple(PRESETS), default=tuple(PRESETS))
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    peak = matmul_peak_gflops()
    print(f"float32 matmul peak (numpy, 2048^3): {peak:.0f} GFLOP/s on {os.cpu_count()} CPU cores", flush=True)
    rows = []
    start = time.perf_counter()
    for preset, task, label, module, job_args, env in plan(args.quick):
        if preset not in args.only:
            continue
        result = run(module, job_args, args.timeout, env)
        rows.append({"preset": preset, "task": task, "label": label, **result})
        key = "train_images_per_s" if task == "train" else "samples_per_s"  # sample, sample10
        shown = f"{result[key]:.1f}" if key in result else result.get("error")
        print(f"  {preset:5} {task:6} {label:16} {key}={shown} ({result.get('process_seconds', 0):.0f} s)", flush=True)
    print_tables(rows, peak)
    backend = next((r["backend"] for r in rows if "backend" in r), "cpu")
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "matmul_peak_gflops": peak},
        "versions": _versions(),
        "quick": args.quick,
        "total_seconds": time.perf_counter() - start,
        "rows": rows,
    }
    out = Path(args.out) if args.out else RESULTS / f"suite-{backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out} ({record['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
