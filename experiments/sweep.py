"""What buys sample quality per CPU minute: ``python -m experiments.sweep --workdir runs/sweep``.

Trains each variant below in ``WORKDIR/<run>`` with ``python -m experiments.mnist``
(one process per run, its wall time measured), evaluates it with
``python -m experiments.evaluate`` at ``--num-samples`` (default 5,000; the
same count for every row, so the FIDs compare), and writes

- ``WORKDIR/sweep.json``: per variant its levers, training wall time, images
  seen and every metric of ``eval.json``;
- ``WORKDIR/sweep.md``: the table;
- ``WORKDIR/sweep.png``: FID and unreadable rate against training minutes.

Everything is resumable: a finished run is not trained again (an interrupted
one resumes from its checkpoint), and a variant whose evaluation is on disk is
not evaluated again. ``--phase train`` trains only (time it on a quiet
machine), ``--phase eval`` evaluates what is trained, ``--phase report``
rebuilds the JSON, table and plot; ``--only NAME ...`` restricts to variants.
Variants marked ``eval_of`` reuse another variant's network with other
sampling options (no training of their own).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

from ddpm_jax.training.workdir import prepare_workdir

# The levers, at the old default's training time (3,000 steps of the 199,025-parameter network,
# about 5 minutes here) unless a row says otherwise; equal-time rows take fewer steps of a costlier
# step, in the ratio of their measured step times. 'cpu' is the new default preset, whole.
VARIANTS: tuple[dict, ...] = (
    {"name": "quick", "what": "old default: unconditional, 16 channels, 3,000 steps (the quick preset)",
     "preset": "quick"},
    {"name": "cond", "what": "class-conditional, labels drawn at the training frequencies, CFG w=1",
     "preset": "cpu", "steps": 3000},
    {"name": "cond_null", "what": "the same network at the null label, unguided", "eval_of": "cond",
     "eval_args": ["--unconditional", "null"]},
    {"name": "cond_beta_tilde", "what": "the same network and labels, sigma_t^2 = beta-tilde", "eval_of": "cond",
     "eval_args": ["--variance", "beta_tilde"]},
    {"name": "cond_min_snr", "what": "class-conditional + min-SNR-5 loss weighting", "preset": "cpu", "steps": 3000,
     "set": ["train.loss_weighting=min_snr", "train.min_snr_gamma=5.0"]},
    {"name": "cond_24ch", "what": "class-conditional, 24 base channels, equal time (1,700 steps)",
     "preset": "cpu", "steps": 1700, "set": ["model.base_channels=24"]},
    {"name": "cpu", "what": "the new default (cpu preset): class-conditional, longer training", "preset": "cpu"},
    {"name": "cpu_w05", "what": "the default's network at guidance w=0.5", "eval_of": "cpu",
     "eval_args": ["--guidance-scale", "0.5"]},
)
NAMES = tuple(v["name"] for v in VARIANTS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/sweep", help="one subfolder per run, plus the results (default: %(default)s)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--idx-dir", default=None, help="MNIST as IDX files in this folder (as for training)")
    data.add_argument("--data-dir", default=None, help="TFDS data directory (as for training)")
    p.add_argument("--num-samples", type=int, default=5000, help="samples per evaluation (default: %(default)s)")
    p.add_argument("--phase", choices=("all", "train", "eval", "report"), default="all")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help=f"these variants only (of: {', '.join(NAMES)})")
    p.add_argument("--cache-dir", default=None, help="the feature classifier's cache (as for experiments.evaluate)")
    return p.parse_args(argv)


def _data_args(args) -> list[str]:
    return ["--idx-dir", args.idx_dir] if args.idx_dir else (["--data-dir", args.data_dir] if args.data_dir else [])


def _run(cmd: list[str]) -> float:
    """Run ``cmd`` (inheriting stdout/stderr), return its wall seconds; a failure stops the sweep."""
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _final_step(run_dir: Path) -> int | None:
    config = run_dir / "config.json"
    return json.loads(config.read_text())["train"]["num_steps"] if config.exists() else None


def _trained(run_dir: Path) -> bool:
    steps = _final_step(run_dir)
    return steps is not None and (run_dir / "checkpoints" / str(steps)).is_dir()


def train(variant: dict, args) -> None:
    run_dir = Path(args.workdir) / variant["name"]
    if _trained(run_dir):
        return
    resumed = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    cmd = [sys.executable, "-m", "experiments.mnist", "--preset", variant["preset"], "--workdir", str(run_dir),
           "--no-progress", *_data_args(args)]
    if "steps" in variant:
        cmd += ["--steps", str(variant["steps"])]
    for assignment in variant.get("set", ()):
        cmd += ["--set", assignment]
    seconds = _run(cmd)
    record = {"seconds": seconds, "resumed": resumed,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (run_dir / "train_time.json").write_text(json.dumps(record, indent=2))


def evaluate(variant: dict, args) -> None:
    result = Path(args.workdir) / "results" / f"{variant['name']}.json"
    run_dir = Path(args.workdir) / variant.get("eval_of", variant["name"])
    if result.exists() and json.loads(result.read_text())["num_samples"] == args.num_samples:
        return
    if not _trained(run_dir):
        print(f"skipping the evaluation of {variant['name']}: {run_dir} is not trained yet", flush=True)
        return
    cmd = [sys.executable, "-m", "experiments.evaluate", "--workdir", str(run_dir), "--num-samples",
           str(args.num_samples), "--no-progress", *_data_args(args), *variant.get("eval_args", ())]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    _run(cmd)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text((run_dir / "eval.json").read_text())


def _row(variant: dict, args) -> dict | None:
    result = Path(args.workdir) / "results" / f"{variant['name']}.json"
    if not result.exists():
        return None
    ev = json.loads(result.read_text())
    run_dir = Path(args.workdir) / variant.get("eval_of", variant["name"])
    config = json.loads((run_dir / "config.json").read_text())
    timing = run_dir / "train_time.json"
    seconds = json.loads(timing.read_text()) if timing.exists() else None
    return {
        "name": variant["name"],
        "what": variant["what"],
        "run": run_dir.name,
        "preset": config["preset"],
        "overrides": variant.get("set", []),
        "eval_args": variant.get("eval_args", []),
        "parameters_config": {"base_channels": config["model"]["base_channels"],
                              "num_classes": config["model"]["num_classes"]},
        "steps": config["train"]["num_steps"],
        "batch_size": config["train"]["batch_size"],
        "images_seen": config["train"]["num_steps"] * config["train"]["batch_size"],
        "train_seconds": None if seconds is None else seconds["seconds"],
        "train_resumed": None if seconds is None else seconds["resumed"],
        **{k: ev[k] for k in ("fid", "fid_floor", "kl_to_uniform", "unreadable_rate", "precision", "recall",
                              "num_samples")},
        "unreadable_rate_at": ev["samples"].get("unreadable_rate_at"),
        "sampling": ev["sampling"],
        "histogram": ev["histogram"],
    }


def report(args) -> list[dict]:
    rows = [r for r in (_row(v, args) for v in VARIANTS) if r is not None]
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"num_samples": args.num_samples, "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    (out / "sweep.json").write_text(json.dumps(info, indent=2))
    lines = ["| variant | what | train min | images seen | samples | FID | unreadable | KL to uniform | precision | recall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        minutes = "same network" if r["run"] != r["name"] else (
            "-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f}")
        lines.append(f"| {r['name']} | {r['what']} | {minutes} | {r['images_seen']:,} | {r['num_samples']:,} | {r['fid']:.1f} "
                     f"(floor {r['fid_floor']:.2f}) | {r['unreadable_rate']:.1%} | {r['kl_to_uniform']:.3f} | "
                     f"{r['precision']:.2f} | {r['recall']:.2f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if rows:
        _plot(rows, out / "sweep.png", args.num_samples)
    return rows


def _plot(rows: list[dict], path: Path, num_samples: int) -> None:
    timed = [r for r in rows if r["train_seconds"] is not None]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "fid", "FID (feature classifier)"),
                           (axes[1], "unreadable_rate", "unreadable rate (top probability < 0.9)")):
        for r in timed:
            x, y = r["train_seconds"] / 60, r[key] * (100 if key == "unreadable_rate" else 1)
            ax.scatter([x], [y], s=30)
            name = r["name"] + ("" if r["num_samples"] == num_samples else f" ({r['num_samples']:,} samples)")
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("training wall time, minutes (2 CPU cores)")
        ax.set_ylabel(label + (" %" if key == "unreadable_rate" else ""))
        ax.set_yscale("log" if key == "fid" else "linear")
        ax.grid(alpha=0.3)
    axes[0].axhline(rows[0]["fid_floor"], color="gray", ls="--", lw=1)
    axes[0].annotate("real images", (0, rows[0]["fid_floor"]), fontsize=8, color="gray", xytext=(2, 3),
                     textcoords="offset points")
    fig.suptitle(f"sample quality against CPU training time ({num_samples:,} samples each unless marked)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_samples < 2:
        print(f"error: --num-samples {args.num_samples}: need at least 2 (use 5000 or more for FIDs to compare).",
              file=sys.stderr)
        return 2
    try:
        args.workdir = prepare_workdir(args.workdir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [v["name"] for v in VARIANTS]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        print(f"error: --only {' '.join(unknown)}: no such variant; variants: {', '.join(names)}.", file=sys.stderr)
        return 2
    variants = [v for v in VARIANTS if args.only is None or v["name"] in args.only]
    for v in variants:  # an evaluation of another variant's network needs that network trained
        if "eval_of" in v and v["eval_of"] not in [u["name"] for u in variants] and args.phase in ("all", "train"):
            variants.insert(variants.index(v), next(u for u in VARIANTS if u["name"] == v["eval_of"]))
    try:
        if args.phase in ("all", "train"):
            for v in variants:
                if "eval_of" not in v:
                    train(v, args)
        if args.phase in ("all", "eval"):
            for v in variants:
                evaluate(v, args)
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(e.cmd[1:4])} ... exited with status {e.returncode}; rerun the same command to "
              "resume.", file=sys.stderr)
        return 1
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
