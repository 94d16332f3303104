"""Check the GPU path in one command: ``python -m benchmarks.gpu_check --out DIR --idx-dir MNIST_DIR``.

Made to fit a few minutes on a borrowed GPU (about 8 on one H200, compilation included). Every part
runs in fresh processes, the commands a user would run, so this process never touches the GPU and
each part finds the whole card free:

1. **The gpu preset**: ``python -m experiments.mnist --preset gpu`` to completion (samples.png),
   timed; then ``python -m experiments.learning_curve --preset gpu --points end`` measures its last
   checkpoint at ``--num-samples`` (10,000) samples: FID, unreadable rate and KL to uniform at its
   default guidance scale, then at the others of ``--guidance-scales``. Its minutes are the training
   command's wall time plus the measurement at the default scale (the classifier's training on first
   use included), against the goals: FID at most twice the real-data floor, unreadable at most the
   test split's rate + 1 point, KL to uniform at most 0.01.
2. **bfloat16 against float32** (``--parts ...,precision``, not in the default): the gpu preset trained
   again with ``model.compute_dtype=bfloat16``, the same length, measured at its default scale.
3. **The speed table** (:func:`benchmarks.__main__.gpu_plan`): ours in float32 and bfloat16 against the
   torch port as written, under bf16 autocast, in ``channels_last``, and compiled, seed and gpu
   presets, for ``--speed-seconds`` (150; rows not started by then are marked skipped).
4. **The report's network on its learning curve**: ``python -m experiments.learning_curve --preset
   seed --points 1M,4M,16M`` with running and recalibrated BatchNorm statistics, its training
   time-limited to what ``--budget`` (480 s) leaves for it, at least a minute (``--curve-seconds``).

Writes to ``--out`` at most 8 files: ``gpu_check.json`` (everything, rewritten after each part, so a
run cut off keeps what it measured), ``summary.md`` (the tables docs/gpu.md's Results show),
``gpu_samples.png``, ``gpu_histogram.png``, ``seed_curve.png`` and ``seed_histogram.png``. Runs and
caches go to ``--workdir`` (default ``/tmp/ddpm-jax-gpu-check``; a rerun resumes the trainings and
reuses the compiled programs). ``--smoke`` runs the same code path on the CPU at toy sizes (tiny
networks, a few steps, a 512-image subset, a one-epoch classifier, three speed rows): the test suite
runs it, so a broken GPU path shows without a GPU. It takes about 3 minutes on 2 CPU cores, nearly all
of it the start-up and compilation of its eight processes.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.__main__ import GPU_PRESETS, KEEP_FLAGS, _versions, detect_backend, gpu_plan, run_jobs
from ddpm_jax.data import IDX_FILES, load_mnist_idx

GOAL_MINUTES = 5.0
GOAL_FID_FACTOR = 2.0  # FID at most this times the real-data floor
GOAL_UNREADABLE_POINTS = 0.01  # unreadable at most the test split's rate + this
GOAL_KL = 0.01
# Dense matrix rates of the NVIDIA H200 (SXM) datasheet, TFLOP/s, for the share of the peak.
PEAK_TFLOPS = {"H200": {"float32": 494.7, "bfloat16": 989.4}}
SEED_POINTS = "1M,4M,16M"
PARTS = ("preset", "precision", "curve", "speed")  # in the order they run; precision is not in the default
FILES = ("gpu_check.json", "summary.md", "gpu_samples.png", "gpu_histogram.png", "seed_curve.png",
         "seed_histogram.png")

# Toy sizes for --smoke: every part's command with these, on the CPU.
SMOKE_NETWORK = ["--set", "model.base_channels=4", "--set", "model.levels=1", "--set", "diffusion.num_timesteps=10",
                 "--set", "sampling.batch_size=16"]
SMOKE_PRESET = ["--steps", "2", "--batch-size", "8", *SMOKE_NETWORK, "--set", "train.warmup_steps=0",
                "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", "--set", "sampling.grid_size=2",
                "--set", "sampling.strip_samples=1", "--set", "sampling.strip_every=5"]
SMOKE_CURVE = ["--steps", "4", "--batch-size", "8", *SMOKE_NETWORK, "--points", "16,32"]
SMOKE_EVAL = ["--num-samples", "16", "--classifier-epochs", "1"]
SMOKE_CURVE_SECONDS = 90.0
SMOKE_SPEED_SECONDS = 600.0  # every smoke row runs
SPEED_ORDER = ("train", "sample", "sample10", "guidance")
# The smoke test's speed rows: our train step and sampler, and the port's train step in its strongest form.
# (torch.compile's own compile, tens of seconds on two cores, is tested in tests/paper/test_peers.py.)
SMOKE_SPEED_ROWS = (("train", "ours"), ("train", "torch port, channels_last + bf16"), ("sample", "ours"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the result files (at most 8)")
    p.add_argument("--idx-dir", default=None, help="MNIST's IDX files (default: TFDS, prepared in --data-dir)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--workdir", default="/tmp/ddpm-jax-gpu-check", help="runs, caches (default: %(default)s)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for the whole check: the seed curve gets what the other parts leave of it "
                        "(default: %(default)s)")
    p.add_argument("--speed-seconds", type=float, default=150.0,
                   help="the speed table starts no row after this many seconds of it (default: %(default)s)")
    p.add_argument("--curve-seconds", type=float, default=None,
                   help="seconds for the seed learning curve, measurements included (default: what the budget "
                        "leaves after the other parts, at least 60)")
    p.add_argument("--num-samples", type=int, default=10_000, help="samples per measurement (default: %(default)s)")
    p.add_argument("--guidance-scales", default="1,0.5,2",
                   help="w to measure the gpu preset at; the first should be its default (default: %(default)s)")
    p.add_argument("--parts", default="preset,curve,speed",
                   help=f"which of {', '.join(PARTS)} to run (default: %(default)s; precision trains the gpu preset "
                        "again in bfloat16, about 4 more minutes)")
    p.add_argument("--smoke", action="store_true", help="the same code path on the CPU at toy sizes, about a minute")
    return p.parse_args(argv)


def write_idx_subset(idx_dir: str | None, out: Path, train: int = 512, test: int = 256) -> Path:
    """The first ``train`` and ``test`` images of MNIST's IDX files (or random digits-shaped images with random
    labels where ``idx_dir`` is None) as gzipped IDX files in ``out``: the smoke test's data."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        if idx_dir is not None:
            images, labels = load_mnist_idx(idx_dir, split)
        else:
            images, labels = rng.integers(0, 256, (n, 28, 28, 1), np.uint8), np.arange(n) % 10
        for name, array in zip(IDX_FILES[split], (images[:n, ..., 0], labels[:n])):
            array = np.asarray(array, np.uint8)
            header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (out / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return out


def run_command(module: str, args: list[str], timeout: float, log: Path) -> dict:
    """``python -m module args`` in a fresh process, its output appended to ``log``: wall seconds and exit code."""
    cmd = [sys.executable, "-m", module, *args]
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **KEEP_FLAGS}).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    tail = log.read_text().splitlines()[-3:]
    print(f"  exit {code} in {seconds:.0f} s: {tail[-1] if tail else ''}", flush=True)
    return {"cmd": " ".join(cmd), "seconds": seconds, "exit": code,
            **({"error": f"timed out after {timeout:.0f} s"} if code is None else
               {"error": tail[-1]} if code else {})}


def preset_part(args, data: list[str], work: Path, log: Path) -> dict:
    """Train the gpu preset as a user would, then measure it; its minutes against the goals."""
    run = work / "gpu"
    smoke = SMOKE_PRESET if args.smoke else []
    train = run_command("experiments.mnist", ["--preset", "gpu", "--workdir", str(run), *data, "--no-progress",
                                              *smoke], 120 if args.smoke else 600, log)
    result = {"train": train}
    if train["exit"] != 0:
        return result
    scales = ",".join(args.guidance_scales.split(",")[:2]) if args.smoke else args.guidance_scales
    measure = run_command("experiments.learning_curve", [
        "--preset", "gpu", "--workdir", str(run), "--points", "end", "--batchnorm", "running",
        "--guidance-scales", scales, "--num-samples", str(args.num_samples), *data,
        "--cache-dir", str(work / "cache"), "--no-progress", *(SMOKE_EVAL if args.smoke else [])],
        180 if args.smoke else 420, log)
    result["measure"] = measure
    curve_file = run / "curve.json"
    if measure["exit"] != 0 or not curve_file.exists():
        return result
    curve = json.loads(curve_file.read_text())
    point = curve["points"][-1]
    default, *others = point["measurements"]
    # The minutes a user waits for a measured model: training, and the measurement at the default scale alone.
    seconds = train["seconds"] + measure["seconds"] - sum(m["sampling_seconds"] for m in others)
    floor, test = curve["floor"], curve["test_split"]
    result.update({
        "minutes": seconds / 60, "images_seen": point["images_seen"], "floor": floor, "test_split": test,
        "measurements": point["measurements"], "images_per_s": curve.get("images_per_s"),
        "goals": {
            "minutes": {"value": seconds / 60, "goal": GOAL_MINUTES, "met": seconds / 60 <= GOAL_MINUTES},
            "fid": {"value": default["fid"], "goal": GOAL_FID_FACTOR * floor["fid"],
                    "met": default["fid"] <= GOAL_FID_FACTOR * floor["fid"]},
            "unreadable": {"value": default["unreadable_rate"], "goal": test["unreadable_rate"] + GOAL_UNREADABLE_POINTS,
                           "met": default["unreadable_rate"] <= test["unreadable_rate"] + GOAL_UNREADABLE_POINTS},
            "kl_to_uniform": {"value": default["kl_to_uniform"], "goal": GOAL_KL,
                              "met": default["kl_to_uniform"] <= GOAL_KL},
        },
    })
    _copy(run / "samples.png", args.out, "gpu_samples.png")
    _copy(run / "histogram.png", args.out, "gpu_histogram.png")
    return result


def precision_part(args, data: list[str], work: Path, log: Path) -> dict:
    """The gpu preset trained again in bfloat16 (the same length) and measured at its default scale, beside the
    float32 run of :func:`preset_part`: images/s and quality at the same length."""
    run = work / "gpu-bf16"
    smoke = SMOKE_PRESET if args.smoke else []
    bf16 = ["--set", "model.compute_dtype=bfloat16"]
    train = run_command("experiments.mnist", ["--preset", "gpu", "--workdir", str(run), *data, "--no-progress",
                                              *bf16, *smoke], 120 if args.smoke else 600, log)
    result = {"train": train}
    if train["exit"] != 0:
        return result
    scale = args.guidance_scales.split(",")[0]
    measure = run_command("experiments.learning_curve", [
        "--preset", "gpu", "--workdir", str(run), "--points", "end", "--batchnorm", "running", "--guidance-scales",
        scale, "--num-samples", str(args.num_samples), *data, "--cache-dir", str(work / "cache"), "--no-progress",
        *(SMOKE_EVAL if args.smoke else [])], 180 if args.smoke else 420, log)
    result["measure"] = measure
    if measure["exit"] == 0 and (run / "curve.json").exists():
        curve = json.loads((run / "curve.json").read_text())
        result.update({"images_per_s": curve.get("images_per_s"), "minutes": train["seconds"] / 60,
                       "measurement": curve["points"][-1]["measurements"][0]})
    return result


def curve_part(args, data: list[str], work: Path, log: Path, seconds: float) -> dict:
    """The seed preset's learning curve, time-limited to ``seconds``."""
    run = work / "seed"
    extra = SMOKE_CURVE + SMOKE_EVAL if args.smoke else ["--points", SEED_POINTS, "--num-samples", str(args.num_samples)]
    measure = run_command("experiments.learning_curve", [
        "--preset", "seed", "--workdir", str(run), "--time-limit", f"{seconds:.0f}s", "--batchnorm",
        "running,recalibrated", *data, "--cache-dir", str(work / "cache"), "--no-progress", *extra],
        seconds + (120 if args.smoke else 240), log)
    result = {"measure": measure}
    if (run / "curve.json").exists():
        result["curve"] = json.loads((run / "curve.json").read_text())
        _copy(run / "curve.png", args.out, "seed_curve.png")
        _copy(run / "histogram.png", args.out, "seed_histogram.png")
    return result


def speed_jobs(smoke: bool) -> list:
    """The speed table's measurements: the GPU suite's, the train rows of both U-Net presets first, then their
    samplers, then the rest, diffusers' last; with ``smoke``, :data:`SMOKE_SPEED_ROWS` of the tiny preset on the CPU."""
    if smoke:
        return [job for job in gpu_plan(True, "", presets=("tiny",), batch=8, n=8, steps=1, peer_device="cpu",
                                        diffusers=False) if job[1:3] in SMOKE_SPEED_ROWS]
    return sorted(gpu_plan(False), key=lambda job: (job[2] == "diffusers", SPEED_ORDER.index(job[1]),
                                                    GPU_PRESETS.index(job[0])))


def speed_part(args, budget: float) -> dict:
    """:func:`speed_jobs` until ``budget`` seconds are spent."""
    jobs = speed_jobs(args.smoke)
    presets = tuple(dict.fromkeys(job[0] for job in jobs))
    rows = run_jobs(jobs, presets, 150.0, max(budget, 0.0))
    return {"rows": rows, "budget_seconds": budget, "summary": speed_summary(rows)}


def speed_summary(rows: list[dict], device_kind: str = "") -> dict:
    """Per preset and task: our best row against the torch port's best, and our TFLOP/s as a share of the peak."""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), None)
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        flops = next((r.get("flops_per_image") for r in rows if r["preset"] == preset and r["task"] == "train"
                      and r["label"] == "ours" and r.get("flops_per_image")), None)
        for task, key in (("train", "train_images_per_s"), ("sample", "samples_per_s")):
            measured = [r for r in rows if r["preset"] == preset and r["task"] == task and r.get(key)]
            ours = max((r for r in measured if r["label"].startswith("ours")), key=lambda r: r[key], default=None)
            peer = max((r for r in measured if r["label"].startswith("torch")), key=lambda r: r[key], default=None)
            entry = {"ours": ours and {"label": ours["label"], "rate": ours[key]},
                     "best_torch": peer and {"label": peer["label"], "rate": peer[key]},
                     "ratio": ours[key] / peer[key] if ours and peer else None}
            if task == "train" and ours and flops:
                entry["tflops"] = ours[key] * flops / 1e12
                dtype = "bfloat16" if "bf16" in ours["label"] else "float32"
                entry["peak_share"] = entry["tflops"] / peak[dtype] if peak else None
            out[f"{preset} {task}"] = entry
    return out


def _copy(source: Path, out: str, name: str) -> None:
    if source.exists():
        shutil.copyfile(source, Path(out) / name)


def _hours(hours: float | None) -> str:
    return "unknown (no training rate logged)" if hours is None else f"{hours:.2f} h"


def summary_markdown(record: dict) -> str:
    """The Markdown summary: the gpu preset against its goals, the seed curve, the speed table, the versions."""
    lines = [f"# GPU check, {record['date']}", "",
             f"{record.get('device_kind') or record['backend']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v), ""]
    preset = record.get("preset") or {}
    if "goals" in preset:
        g = preset["goals"]
        lines += ["## gpu preset: `python -m experiments.mnist` to a measured model", "",
                  f"{preset['images_seen']:,} images seen; floor FID {preset['floor']['fid']:.2f} (real training "
                  f"images), test split unreadable {preset['test_split']['unreadable_rate']:.2%}.", "",
                  "| | measured | goal | met |", "| --- | --- | --- | --- |"]
        fmt = {"minutes": "{:.2f}", "fid": "{:.2f}", "unreadable": "{:.2%}", "kl_to_uniform": "{:.4f}"}
        for name, v in g.items():
            lines.append(f"| {name} | {fmt[name].format(v['value'])} | {fmt[name].format(v['goal'])} | "
                         f"{'yes' if v['met'] else '**no**'} |")
        lines += ["", "| setting | FID | unreadable | KL to uniform | sampling s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {m['setting']} | {m['fid']:.2f} | {m['unreadable_rate']:.2%} | {m['kl_to_uniform']:.4f} | "
                  f"{m['sampling_seconds']:.1f} |" for m in preset["measurements"]]
        lines.append("")
    elif preset:
        lines += ["## gpu preset", "", f"failed: {(preset.get('measure') or preset['train']).get('error')}", ""]
    precision = record.get("precision") or {}
    if "measurement" in precision and "goals" in preset:
        f32, bf16 = preset["measurements"][0], precision["measurement"]
        rows = (("float32", preset.get("images_per_s"), preset["train"]["seconds"] / 60, f32),
                ("bfloat16", precision.get("images_per_s"), precision["minutes"], bf16))
        lines += ["## gpu preset in float32 and bfloat16, the same length", "",
                  "| precision | train images/s | training minutes | FID | unreadable | KL to uniform |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {rate or 0:,.0f} | {minutes:.2f} | {m['fid']:.2f} | {m['unreadable_rate']:.2%} | "
                  f"{m['kl_to_uniform']:.4f} |" for name, rate, minutes, m in rows]
        lines.append("")
    curve = (record.get("curve") or {}).get("curve")
    if curve:
        lines += ["## seed preset (the report's network) on its learning curve", "",
                  f"{curve.get('images_per_s') or 0:,.0f} training images/s; the rest of its "
                  f"{curve['total_images']:,} images: {_hours(curve.get('rest_of_run_hours'))}.", "",
                  "| images seen | setting | FID | unreadable | KL to uniform |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {p['images_seen']:,} | {m['setting']} | {m['fid']:.2f} | {m['unreadable_rate']:.2%} | "
                  f"{m['kl_to_uniform']:.4f} |" for p in curve["points"] for m in p["measurements"]]
        prediction = curve.get("prediction_at_end")
        if prediction:
            lines += ["", f"A power law through the points predicts FID {prediction['fid']:.2f} at "
                          f"{prediction['images']:,} images (exponent {prediction['exponent']:.2f})."]
        lines.append("")
    speed = record.get("speed") or {}
    if speed.get("summary"):
        lines += ["## Speed: ours against the strongest PyTorch port", "",
                  "| preset, task | ours (best row) | torch (best row) | ratio | TFLOP/s | share of peak |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, e in speed["summary"].items():
            ours, peer = e["ours"], e["best_torch"]
            cell = (lambda r: f"{r['rate']:,.0f} ({r['label']})" if r else "-")
            lines.append(f"| {name} | {cell(ours)} | {cell(peer)} | "
                         f"{'-' if e['ratio'] is None else format(e['ratio'], '.2f')} | "
                         f"{'-' if e.get('tflops') is None else format(e['tflops'], '.1f')} | "
                         f"{'-' if e.get('peak_share') is None else format(e['peak_share'], '.1%')} |")
        skipped = [f"{r['preset']} {r['task']} {r['label']}" for r in speed["rows"] if r.get("skipped")]
        failed = [f"{r['preset']} {r['task']} {r['label']}: {r['error']}" for r in speed["rows"] if r.get("error")]
        lines += [""] + [f"- skipped (budget): {', '.join(skipped)}"] * bool(skipped) + \
            [f"- failed: {f}" for f in failed]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.workdir)
    parts = {p.strip() for p in args.parts.split(",")}
    if not parts <= set(PARTS):
        print(f"error: --parts {args.parts}: choose from {', '.join(PARTS)}.", file=sys.stderr)
        return 2
    if not (args.smoke or args.idx_dir or args.data_dir or importlib.util.find_spec("tensorflow_datasets")):
        print("error: no MNIST to train on: give --idx-dir DIR (the four MNIST IDX files) or --data-dir (TFDS, "
              "which is not installed here).", file=sys.stderr)
        return 2
    probe = {"backend": "cpu"} if args.smoke else detect_backend()
    if not args.smoke and probe.get("backend") != "gpu":
        print(f"error: JAX's default backend is {probe.get('backend')!r}, not 'gpu' "
              f"({probe.get('error') or 'is the CUDA plugin installed?'}); --smoke runs the same path on the CPU.",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "gpu_check.log"
    data = (["--idx-dir", str(write_idx_subset(args.idx_dir, work / "data"))] if args.smoke else
            ["--idx-dir", args.idx_dir] if args.idx_dir else ["--data-dir", args.data_dir] if args.data_dir else [])
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "backend": probe.get("backend"), "device_kind": probe.get("device_kind"), "smoke": args.smoke,
              "budget_seconds": args.budget, "versions": _versions(), "complete": False}

    def save() -> None:
        record["seconds"] = time.perf_counter() - start
        (out / "gpu_check.json").write_text(json.dumps(record, indent=2))
        (out / "summary.md").write_text(summary_markdown(record))

    if "preset" in parts:
        record["preset"] = preset_part(args, data, work, log)
        save()
    if "precision" in parts:
        record["precision"] = precision_part(args, data, work, log)
        save()
    if "speed" in parts:  # before the curve, which takes whatever time is left
        record["speed"] = speed_part(args, SMOKE_SPEED_SECONDS if args.smoke else args.speed_seconds)
        record["speed"]["summary"] = speed_summary(record["speed"]["rows"], probe.get("device_kind") or "")
        save()
    if "curve" in parts:
        left = args.budget - (time.perf_counter() - start)
        seconds = SMOKE_CURVE_SECONDS if args.smoke else args.curve_seconds or max(60.0, left)
        record["curve"] = curve_part(args, data, work, log, seconds)
        save()
    record["complete"] = True
    save()
    print(summary_markdown(record))
    print(f"wrote {', '.join(f for f in FILES if (out / f).exists())} to {out} "
          f"({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
