"""The benchmark suite: ours and the PyTorch peers on the same work, side by side, in one run.

    python -m benchmarks                 # everything (7-25 minutes on 2 CPU cores)
    python -m benchmarks --quick         # fewer timed steps, for a smoke test
    python -m benchmarks --device gpu    # the GPU suite (below; estimated 3.5-4.5 minutes on one H200)

``--device auto`` (the default) asks JAX's default backend in a throw-away
process (the suite's own process never touches a GPU, so that every
measurement finds the whole card free) and runs the GPU suite where it is
``gpu``, the CPU suite otherwise; ``--device gpu`` refuses to run without one.

Every measurement runs in a fresh process (``benchmarks.ours`` /
``benchmarks.peers``) so compile caches, thread pools and peak memory do not
leak between them. Rows:

- ``ours``: our jitted train step and sampler as shipped (``conv_impl='auto'``, and
  the XLA flag of ``ddpm_jax/cpu/settings.py``);
- ``ours, 256-bit vectors`` (a processor with AVX-512 only): without the flag that lets XLA's own fused loops
  use 512-bit vectors (``XLA_FLAGS=--xla_cpu_prefer_vector_width=256``), i.e. XLA's default width;
- ``ours, no native kernels``: XLA's 3x3 convolutions where ``conv_impl='auto'`` would take the native CPU
  kernels of ``ddpm_jax/cpu/kernels.py`` (``DDPM_JAX_NATIVE_KERNELS=0``), i.e. what a machine without a C++
  compiler runs;
- ``ours, no XLA flags``: neither of ``ddpm_jax/cpu/settings.py``'s flags (``DDPM_JAX_KEEP_XLA_FLAGS=1``): YNNPACK's
  fusions, XLA's default vector width;
- ``ours, glibc's malloc`` (train): without ``ddpm_jax/cpu/settings.py``'s allocator setting
  (``DDPM_JAX_KEEP_MALLOC=1``), so that each step's scratch buffer is mapped afresh, page faults and all;
- ``ours, before``: every convolution left to XLA (``conv_impl='xla'``), no flag, glibc's own
  allocator settings and JAX's rolled threefry loop on the CPU, i.e. the code without any of its CPU work;
- ``torch port``: the report's U-Net in plain PyTorch (``benchmarks/peers.py``), same work;
- ``torch port, our malloc`` (train): the same, started with our allocator settings as glibc tunables
  (:data:`MALLOC_TUNABLES`), to show what they would do for the peer;
- ``diffusers``: ``UNet2DModel`` of about the same size with ``DDPMScheduler``'s loop (seed size only).

And few-step sampling (``sample10``): 100 samples in 10 reverse steps, ours with DDIM
over 10 of the 100 training steps, the torch port's loop over 10 steps, diffusers'
``DDIMScheduler`` with 10 inference steps.

And the cost of classifier-free guidance (``guidance``, cpu preset on the CPU):
``benchmarks.ours guidance``, 100 class-conditional samples through ``ddpm_jax.sample``
at w = 0 and at w = 1, whose network call runs on a doubled batch.

Train: images/s (median over timed steps), first step (compile) seconds, and
the share of the machine's float32 matmul peak (numpy GEMM, measured here)
that XLA's FLOP count of our step implies. Sampling: samples/s for 100 images
with T = 100 reverse steps. Ratios are ours / peer. Writes
``benchmarks/results/suite-<cpu|gpu>.json`` and prints the tables.
Needs the ``bench`` extra: ``pip install -e ".[bench]"``. Rows of a peer whose
library is not installed (diffusers) are skipped and marked so in the table and JSON.

The GPU suite (``--device gpu``; one GPU, measured in one short run): batch 1000
for training and 1000 samples for sampling, 20 timed train steps (``--quick``: 5),
torch peers with ``--device cuda``. In order of priority, for the seed preset (the report's network),
the gpu preset (the same network, class-conditional with a conv head; ours and the port both measure the
network alone) and the cpu preset:

- train and sampling (1000 x 100 steps), ours in float32 and in bfloat16 (``ours, bf16``:
  ``--compute-dtype bfloat16``) against the torch port in each of :data:`TORCH_VARIANTS`: as written
  (float32, PyTorch's TF32 defaults), under bf16 autocast, in ``channels_last`` memory format, both, and
  both under ``torch.compile`` (compilation in the untimed warm-up); the cpu preset's small network
  against the plain port only;
- seed preset: few-step sampling (ours DDIM over 10 steps, the port's loop over 10 steps), the guidance
  row at 1000 samples, and diffusers' rows (when installed).

The rows CPU work is about (``ours, no native kernels``, ``ours, 256-bit vectors``, ``ours, no XLA flags``,
``ours, before``) are not run:
on a GPU ``conv_impl='auto'`` is XLA's convolution and the flags concern XLA's
CPU backend only. The table shows achieved TFLOP/s (XLA's FLOP count of our step x
images/s, the same count for the port's rows) in place of the CPU's peak share, and
the device's peak memory in use (JAX ``peak_bytes_in_use``, torch
``max_memory_allocated``) in place of peak RSS; ``ours/this`` of a bf16 row compares
with ``ours, bf16``.

Its time goes mostly to starting processes (a few seconds each) and compiling the
12.5M-parameter U-Net's programs (expected: tens of seconds each on a GPU, autotuning
included; the steps themselves take milliseconds). So every measurement is still one fresh process,
one program each (f32 and bf16 train steps are two programs either way; merging
processes would save only their start-up), and: the subprocesses share a JAX
persistent compilation cache (``--compile-cache``, default
``/tmp/ddpm-jax-bench-xla-cache``; with it JAX enables XLA's per-fusion GPU autotuning
cache, so a program can reuse the tuning of convolutions it shares with an earlier
one, and a rerun on the same machine compiles little; ``compile_cache_warm`` in the JSON says whether it held
anything at the start, which shortens the first-step times); no measurement is
started once ``--budget`` seconds (default 210) have passed, so the lowest rows are
skipped, and marked so, rather than the run overrunning (the last one started may
run a minute past it); ``--timeout`` is 150 s per measurement; and the JSON is
rewritten after every measurement (``"complete": false`` until the end), so a run
that is cut off still leaves what it measured. ``DDPM_JAX_KEEP_XLA_FLAGS=1`` is set
for every GPU measurement: the XLA flag of ``ddpm_jax/cpu/settings.py`` is a CPU-backend
flag, and a jaxlib that no longer knew it would abort every process.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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
GPU_BATCH = 1000  # GPU suite: the train batch and the number of samples, both presets
GPU_STEPS = 20  # GPU suite: timed train steps (milliseconds each)
GPU_BUDGET = 210.0  # GPU suite: seconds after which no further measurement is started
GPU_TIMEOUT = 150.0  # GPU suite: seconds per measurement
XLA_CACHE = "/tmp/ddpm-jax-bench-xla-cache"

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


def run(module: str, args: list[str], timeout: float, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``python -m module args`` in a fresh process (in ``cwd``, default this one's); its last stdout line is a
    JSON result."""
    cmd = [sys.executable, "-m", module, *args]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                             cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(cmd)}
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {out.returncode}", "stderr_tail": lines[-20:],
                "cmd": " ".join(cmd)}
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": "no JSON result on stdout's last line", "stdout_tail": out.stdout.strip().splitlines()[-5:],
                "stderr_tail": out.stderr.strip().splitlines()[-20:], "cmd": " ".join(cmd)}
    result.update({"cmd": " ".join(cmd), "process_seconds": wall})
    return result


def detect_backend(timeout: float = 120) -> dict:
    """JAX's default backend and first device, asked in a throw-away process (this one never touches a GPU)."""
    code = ("import json, jax; d = jax.devices()[0]; "
            "print(json.dumps({'backend': jax.default_backend(), 'device_kind': d.device_kind, "
            "'device_count': jax.device_count()}))")
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        return {"backend": None, "error": "could not ask JAX for its backend"}


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


# Our rows: the code as shipped, without the XLA flag of ddpm_jax/cpu/settings.py, and without any of its CPU work.
KEEP_FLAGS = {"DDPM_JAX_KEEP_XLA_FLAGS": "1"}
VECTORS_256 = {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}  # our other flag is still added
NO_NATIVE = {"DDPM_JAX_NATIVE_KERNELS": "0"}
KEEP_MALLOC = {"DDPM_JAX_KEEP_MALLOC": "1"}
KEEP_RNG = {"DDPM_JAX_KEEP_RNG_LOWERING": "1"}
# ddpm_jax.xla_cpu.MALLOC_SETTINGS as glibc tunables (read at a process's start), for the torch port's process.
# Written out rather than imported: importing ddpm_jax here would put its XLA flags into every child's
# environment, the rows without them included (tests/machinery/test_benchmarks.py checks the two agree).
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"
LABELS = ("ours", "ours, no native kernels", "ours, 256-bit vectors", "ours, no XLA flags", "ours, glibc's malloc",
          "ours, before", "torch port", "torch port, our malloc", "diffusers")
GPU_LABELS = ("ours", "ours, bf16", "torch port", "torch port, bf16", "torch port, channels_last",
              "torch port, channels_last + bf16", "torch port, compiled + bf16", "diffusers")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The processor's model name and whether it has AVX-512 (``avx512f``), from ``/proc/cpuinfo`` where it exists."""
    model, avx512 = None, False
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags":
                    avx512 = avx512 or "avx512f" in value.split()
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "avx512": avx512}


def machine_line(cpu: dict, peak: float) -> str:
    """The first line of a CPU measurement: processor (:func:`cpu_info`), cores and numpy's GEMM rate."""
    return (f"machine: {cpu['model']}, {os.cpu_count()} cores{', AVX-512' if cpu['avx512'] else ''}; float32 "
            f"matmul peak (numpy, 2048^3): {peak:.0f} GFLOP/s")


def plan(quick: bool, avx512: bool | None = None,
         steps: int | None = None) -> list[tuple[str, str, str, str, list[str], dict]]:
    """(preset, task, label, module, args, extra environment) for every measurement; the 256-bit rows only with
    AVX-512 (``avx512``; default: this processor's); ``steps`` timed train steps (default: 3 quick, else 5)."""
    steps = str(steps) if steps is not None else "3" if quick else "5"
    avx512 = cpu_info()["avx512"] if avx512 is None else avx512
    jobs = []
    for preset, p in PRESETS.items():
        batch = str(p["batch"])
        slow_before = preset == "seed"  # XLA's 2x2 convolutions: seconds per step
        ours = ["--preset", preset]
        jobs += [
            (preset, "train", "ours", "benchmarks.ours", ["train", *ours, "--batch", batch, "--steps", steps], {}),
            (preset, "train", "ours, no native kernels", "benchmarks.ours",
             ["train", *ours, "--batch", batch, "--steps", steps], NO_NATIVE),
            *([(preset, "train", "ours, 256-bit vectors", "benchmarks.ours",
                ["train", *ours, "--batch", batch, "--steps", steps], VECTORS_256)] if avx512 else []),
            (preset, "train", "ours, no XLA flags", "benchmarks.ours",
             ["train", *ours, "--batch", batch, "--steps", steps], KEEP_FLAGS),
            (preset, "train", "ours, glibc's malloc", "benchmarks.ours",
             ["train", *ours, "--batch", batch, "--steps", steps], KEEP_MALLOC),
            (preset, "train", "ours, before", "benchmarks.ours",
             ["train", *ours, "--conv-impl", "xla", "--batch", batch, "--steps", "2" if slow_before else steps],
             {**KEEP_FLAGS, **KEEP_MALLOC, **KEEP_RNG}),
            (preset, "train", "torch port", "benchmarks.peers",
             ["torch-train", *p["peer"], "--batch", batch, "--steps", steps, "--json"], {}),
            (preset, "train", "torch port, our malloc", "benchmarks.peers",
             ["torch-train", *p["peer"], "--batch", batch, "--steps", steps, "--json"],
             {"GLIBC_TUNABLES": MALLOC_TUNABLES}),
            (preset, "sample", "ours", "benchmarks.ours", ["sample", *ours, "--n", "100"], {}),
            (preset, "sample", "ours, no native kernels", "benchmarks.ours", ["sample", *ours, "--n", "100"],
             NO_NATIVE),
            *([(preset, "sample", "ours, 256-bit vectors", "benchmarks.ours", ["sample", *ours, "--n", "100"],
                VECTORS_256)] if avx512 else []),
            (preset, "sample", "ours, no XLA flags", "benchmarks.ours", ["sample", *ours, "--n", "100"], KEEP_FLAGS),
            (preset, "sample", "ours, before", "benchmarks.ours",
             ["sample", *ours, "--conv-impl", "xla", "--n", "100"] + (["--steps-to-time", "3"] if slow_before else []),
             {**KEEP_FLAGS, **KEEP_MALLOC, **KEEP_RNG}),
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
        if preset == "cpu":  # about 20 s; the seed preset's would take minutes on the CPU
            jobs.append((preset, "guidance", "ours", "benchmarks.ours",
                         ["guidance", *ours, "--n", "100", "--guidance-scale", "1"], {}))
    return jobs


# The PyTorch port's flags for each preset's network (the GPU suite also times the gpu preset, and its smoke
# test the tiny one); and what each GPU row of the port runs with.
PEER_FLAGS = {
    **{preset: p["peer"] for preset, p in PRESETS.items()},
    "gpu": ["--base-channels", "32", "--levels", "4", "--output-head", "conv", "--image-size", "32"],
    "tiny": ["--base-channels", "4", "--levels", "1", "--output-head", "block", "--image-size", "28",
             "--num-timesteps", "10"],
}
TORCH_VARIANTS = {  # label -> flags, in the order of the table; the strongest usual PyTorch settings last
    "torch port": [],
    "torch port, bf16": ["--amp", "bf16"],
    "torch port, channels_last": ["--channels-last"],
    "torch port, channels_last + bf16": ["--channels-last", "--amp", "bf16"],
    "torch port, compiled + bf16": ["--channels-last", "--amp", "bf16", "--compile"],
}


GPU_PRESETS = ("seed", "gpu", "cpu")  # the GPU suite's, most wanted first


def gpu_plan(quick: bool, compile_cache: str = XLA_CACHE, *, presets: tuple[str, ...] = GPU_PRESETS,
             batch: int = GPU_BATCH, n: int = GPU_BATCH, steps: int | None = None, peer_device: str = "cuda",
             diffusers: bool = True) -> list[tuple[str, str, str, str, list[str], dict]]:
    """The GPU suite's measurements, most wanted first (see the module's docstring).

    Per preset: our train step and sampler in float32 and bfloat16 against the torch port in each of
    :data:`TORCH_VARIANTS`; the seed preset also few-step sampling, the guidance row and diffusers' rows
    (``diffusers``). ``batch``, ``n``, ``steps`` and ``peer_device`` shrink it for a CPU smoke test
    (:mod:`benchmarks.gpu_check` ``--smoke``)."""
    steps = str(steps if steps is not None else 5 if quick else GPU_STEPS)
    n, batch = str(n), str(batch)
    peer_json = ["--device", peer_device, "--json"]
    # Ours: the shared compilation cache. Both: no CPU-backend XLA flag (the peers' JAX runs on the CPU).
    ours_env = {**KEEP_FLAGS, **({"JAX_COMPILATION_CACHE_DIR": compile_cache} if compile_cache else {})}
    peer_env = KEEP_FLAGS
    bf16 = ["--compute-dtype", "bfloat16"]
    jobs = []
    for preset in presets:
        peer, ours, train = PEER_FLAGS[preset], ["--preset", preset], ["--batch", batch, "--steps", steps]
        variants = TORCH_VARIANTS if preset != "cpu" else {"torch port": []}  # the small network: one row each
        jobs += [
            (preset, "train", "ours", "benchmarks.ours", ["train", *ours, *train], ours_env),
            (preset, "train", "ours, bf16", "benchmarks.ours", ["train", *ours, *train, *bf16], ours_env),
            *[(preset, "train", label, "benchmarks.peers", ["torch-train", *peer, *train, *flags, *peer_json],
               peer_env) for label, flags in variants.items()],
            (preset, "sample", "ours", "benchmarks.ours", ["sample", *ours, "--n", n], ours_env),
            (preset, "sample", "ours, bf16", "benchmarks.ours", ["sample", *ours, "--n", n, *bf16], ours_env),
            *[(preset, "sample", label, "benchmarks.peers", ["torch-sample", *peer, "--n", n, *flags, *peer_json],
               peer_env) for label, flags in variants.items()],
        ]
        if preset == "seed":
            jobs += [
                (preset, "sample10", "ours", "benchmarks.ours",
                 ["sample", *ours, "--n", n, "--sample-steps", str(FEW_STEPS), "--method", "ddim"], ours_env),
                *[(preset, "sample10", label, "benchmarks.peers",
                   ["torch-sample", *peer, "--n", n, "--num-timesteps", str(FEW_STEPS), *TORCH_VARIANTS[label],
                    *peer_json], peer_env) for label in ("torch port", "torch port, channels_last + bf16")],
                (preset, "guidance", "ours", "benchmarks.ours",
                 ["guidance", *ours, "--n", n, "--guidance-scale", "1"], ours_env),
            ]
            if diffusers:
                jobs += [
                    (preset, "train", "diffusers", "benchmarks.peers", ["diffusers-train", *train, *peer_json],
                     peer_env),
                    (preset, "sample", "diffusers", "benchmarks.peers", ["diffusers-sample", "--n", n, *peer_json],
                     peer_env),
                    (preset, "sample10", "diffusers", "benchmarks.peers",
                     ["diffusers-sample", "--n", n, "--inference-steps", str(FEW_STEPS), *peer_json], peer_env),
                ]
    return jobs


def run_jobs(jobs, only, timeout: float, budget: float | None = None, runner=None, on_row=None) -> list[dict]:
    """Run ``jobs`` (of presets in ``only``) one process each; rows in order, skipped ones marked.

    A diffusers row is skipped when diffusers is not importable; with ``budget``, every job
    not yet started when ``budget`` seconds have passed. ``on_row(rows)`` after each row.
    """
    runner = runner or run
    have_diffusers = diffusers_available()
    rows = []
    start = time.perf_counter()
    for preset, task, label, module, job_args, env in jobs:
        if preset not in only:
            continue
        if job_args[0].startswith("diffusers") and not have_diffusers:
            result = {"skipped": "diffusers is not installed", "cmd": " ".join(["-m", module, *job_args])}
        elif budget is not None and time.perf_counter() - start >= budget:
            result = {"skipped": f"over the time budget ({budget:.0f} s)", "cmd": " ".join(["-m", module, *job_args])}
        else:
            result = runner(module, job_args, timeout, env)
        rows.append({"preset": preset, "task": task, "label": label, **result})
        key = "train_images_per_s" if task == "train" else "samples_per_s"  # sample, sample10, guidance
        shown = f"{result[key]:.1f}" if key in result else result.get("error") or f"skipped: {result.get('skipped')}"
        if "guided_samples_per_s" in result:
            shown += f", w={result['guidance_scale']:g}: {result['guided_samples_per_s']:.1f}"
        print(f"  {preset:5} {task:6} {label:16} {key}={shown} ({result.get('process_seconds', 0):.0f} s)", flush=True)
        if on_row:
            on_row(rows)
    return rows


def _versions() -> dict:
    versions = {}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def _why(row: dict) -> str:
    """What a row holds instead of a number: its error, 'skipped', or '-'."""
    return row.get("error") or ("skipped" if row.get("skipped") else "-")


def print_tables(rows: list[dict], peak: float | None, sizes: dict | None = None, labels=LABELS) -> None:
    """The tables. ``peak``: the CPU's float32 GEMM GFLOP/s, for the peak-share column; None (the GPU
    suite): achieved TFLOP/s and the device's peak memory instead. ``sizes``: preset -> (train batch, samples)."""
    sizes = sizes or {preset: (p["batch"], 100) for preset, p in PRESETS.items()}
    gpu = peak is None
    for preset, (batch, n) in sizes.items():
        train = {r["label"]: r for r in rows if r["preset"] == preset and r["task"] == "train"}
        sample = {r["label"]: r for r in rows if r["preset"] == preset and r["task"] == "sample"}
        flops = (train.get("ours") or {}).get("flops_per_image")
        print(f"\n{preset} preset: train step (batch {batch}) and {n} samples x 100 steps")
        print(f"{'':24} {'train img/s':>11} {'ours/this':>9} {'1st step s':>10} "
              f"{'TFLOP/s' if gpu else 'peak share':>10} "
              f"{'samples/s':>10} {'ours/this':>9} {'GPU peak MB' if gpu else 'peak RSS MB':>11}")
        for label in labels:
            t, s = train.get(label), sample.get(label)
            if t is None and s is None:
                continue
            t, s = t or {}, s or {}
            # A bf16 row is compared with our bf16 row; every other row with ours.
            reference = "ours, bf16" if label.endswith("bf16") else "ours"
            ours_train = (train.get(reference) or {}).get("train_images_per_s")
            ours_sample = (sample.get(reference) or {}).get("samples_per_s")
            ips, sps = t.get("train_images_per_s"), s.get("samples_per_s")
            if gpu:
                share = ips * flops / 1e12 if ips and flops and label != "diffusers" else None
                memory = [r["device_peak_mb"] for r in (t, s) if r.get("device_peak_mb")]
                memory_cell = f"{max(memory):11.0f}" if memory else f"{'-':>11}"
            else:
                share = ips * flops / 1e9 / peak if ips and flops and label != "diffusers" else None
                memory_cell = f"{max(t.get('peak_rss_mb', 0), s.get('peak_rss_mb', 0)):11.0f}"
            cells = [
                f"{ips:11.1f}" if ips else f"{_why(t)[:11]:>11}",
                f"{ours_train / ips:9.2f}" if ips and ours_train else f"{'-':>9}",
                f"{t['first_step_seconds']:10.1f}" if t.get("first_step_seconds") else f"{'-':>10}",
                (f"{share:10.1f}" if gpu else f"{share:10.0%}") if share else f"{'-':>10}",
                (f"{sps:9.2f}" + ("*" if s.get("extrapolated") else " ")) if sps else f"{_why(s)[:10]:>10}",
                f"{ours_sample / sps:9.2f}" if sps and ours_sample else f"{'-':>9}",
                memory_cell,
            ]
            print(f"{label:24} " + " ".join(cells))
        few = {r["label"]: r for r in rows if r["preset"] == preset and r["task"] == "sample10"}
        ours_few = (few.get("ours") or {}).get("samples_per_s")
        if few:
            print(f"{preset} preset, few-step sampling: {n} samples in {FEW_STEPS} steps "
                  "(ours: DDIM eta=0; torch port: its loop over 10 steps; diffusers: DDIMScheduler)")
            for label, r in few.items():
                sps = r.get("samples_per_s")
                print(f"{label:24} {f'{sps:10.2f}' if sps else _why(r)[:10]:>10} "
                      f"{f'{ours_few / sps:9.2f}' if sps and ours_few else '-':>9}")
        guided = {r["label"]: r for r in rows if r["preset"] == preset and r["task"] == "guidance"}
        if guided:
            print(f"{preset} preset, classifier-free guidance: {n} class-conditional samples x 100 steps "
                  "through ddpm_jax.sample, w = 0 and w > 0 (the network on a doubled batch)")
            print(f"{'':24} {'w=0 samp/s':>10} {'w>0 samp/s':>10} {'w>0 / w=0 time':>15}")
            for label, r in guided.items():
                sps, gps, ratio = r.get("samples_per_s"), r.get("guided_samples_per_s"), r.get("guided_time_ratio")
                print(f"{label:24} {f'{sps:10.2f}' if sps else _why(r)[:10]:>10} "
                      f"{f'{gps:10.2f}' if gps else '-':>10} {f'{ratio:15.2f}' if ratio else '-':>15}")
    print("\n* extrapolated from timed reverse steps (or forward passes) to all 100 steps.")
    if gpu:
        print("TFLOP/s: XLA's FLOP count of our float32 step x train images/s (the port does the same work). "
              "ours/this of a bf16 row: ours, bf16 / that row.")
    for r in rows:
        if r.get("skipped"):
            print(f"skipped: {r['preset']} {r['task']} {r['label']}: {r['skipped']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps, extrapolated sampling")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the GPU suite where JAX's default backend is gpu, else the CPU suite")
    p.add_argument("--only", nargs="+", choices=GPU_PRESETS, default=None,
                   help="presets to measure (default: the CPU suite's seed and cpu; the GPU suite's seed, gpu and cpu)")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds per measurement (default 300; GPU suite {GPU_TIMEOUT:.0f})")
    p.add_argument("--budget", type=float, default=None,
                   help=f"start no measurement after this many seconds (default: none; GPU suite {GPU_BUDGET:.0f})")
    p.add_argument("--compile-cache", default=XLA_CACHE,
                   help="GPU suite: JAX's persistent compilation cache for every measurement ('' for none)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    probe = {}
    if args.device != "cpu":
        probe = detect_backend()
        if probe.get("error"):
            print(f"note: {probe['error']}; running the CPU suite", file=sys.stderr)
        if args.device == "gpu" and probe.get("backend") != "gpu":
            print(f"--device gpu: JAX's default backend is {probe.get('backend')!r}, not 'gpu' "
                  f"({probe.get('error') or 'is the CUDA plugin installed, and is JAX_PLATFORMS unset?'}).",
                  file=sys.stderr)
            return 2
    device = "gpu" if probe.get("backend") == "gpu" else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"suite-{device}.json"

    if device == "gpu":
        peak = None
        sizes = {preset: (GPU_BATCH, GPU_BATCH) for preset in GPU_PRESETS}
        jobs, labels = gpu_plan(args.quick, args.compile_cache), GPU_LABELS
        timeout = args.timeout or GPU_TIMEOUT
        budget = GPU_BUDGET if args.budget is None else args.budget
        cache = Path(args.compile_cache) if args.compile_cache else None
        extra = {"device": "gpu", "gpu": probe.get("device_kind"), "gpu_count": probe.get("device_count"),
                 "budget_seconds": budget, "compile_cache_dir": args.compile_cache or None,
                 "compile_cache_warm": bool(cache and cache.is_dir() and any(cache.iterdir()))}
        print(f"GPU suite on {probe.get('device_kind')}: batch {GPU_BATCH}, {GPU_BATCH} samples; no measurement "
              f"started after {budget:.0f} s; compile cache {args.compile_cache or 'off'}"
              f"{' (warm)' if extra['compile_cache_warm'] else ''}", flush=True)
    else:
        peak, cpu = matmul_peak_gflops(), cpu_info()
        print(machine_line(cpu, peak), flush=True)
        sizes, jobs, labels = None, plan(args.quick, cpu["avx512"]), LABELS
        timeout, budget = args.timeout or 300, args.budget
        extra = {"device": "cpu", "cpu_model": cpu["model"], "avx512": cpu["avx512"]}

    start = time.perf_counter()
    versions = {}  # asked once (imports torch and JAX in this process, which touches no device)

    def record(rows: list[dict], complete: bool) -> dict:
        if not versions:
            versions.update(_versions())
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "matmul_peak_gflops": peak},
            **extra,
            "versions": versions,
            "quick": args.quick,
            "complete": complete,
            "total_seconds": time.perf_counter() - start,
            "rows": rows,
        }

    def write(rows: list[dict], complete: bool) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record(rows, complete), indent=2))

    # The GPU suite rewrites its JSON after every measurement, so that a run cut off keeps what it measured.
    on_row = (lambda rows: write(rows, False)) if device == "gpu" else None
    only = args.only or (GPU_PRESETS if device == "gpu" else tuple(PRESETS))
    rows = run_jobs(jobs, only, timeout, budget, on_row=on_row)
    print_tables(rows, peak, sizes, labels)
    write(rows, True)
    print(f"wrote {out} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
