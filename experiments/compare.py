"""What each switch buys: ``python -m experiments.compare --idx-dir DIR --workdir runs/compare``.

Or two (or more) runs' loss curves on one figure, nothing trained:
``python -m experiments.compare --curves runs/a runs/b --out loss_compare.png``.

Trains once per distinct training setup (the quick preset, with a learned
variance, and the DDPM U-Net; same data and batch, and the same training time:
see the setups below) and measures every variant with the evaluation's
metrics: FID (and its real-data floor), KL of the digit histogram to
uniform, the unreadable rate, the test split's negative log-likelihood bound in
bits/dim, samples/s and train images/s. Writes ``WORKDIR/compare.json`` and
``WORKDIR/compare.md`` (the table of docs/results.md, "What each switch buys").

The comparison also draws its training runs' loss curves on one figure, ``WORKDIR/loss_curves.png``.

Variants that differ only in how they sample (the weights, the sampler, the
number of steps) share one trained run. Each measurement is kept in the
variant's folder, so a killed comparison rerun with the same flags picks up
where it stopped (training resumes, finished evaluations are read back).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from ddpm_jax import configs as configs_lib
from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import evaluate
from ddpm_jax.cli.flags import apply_override
from ddpm_jax.evaluation.figures import write_loss_plot
from ddpm_jax.training import train as train_lib
from experiments import likelihood

# Training setups: (preset, steps or None for the preset's, --set overrides). The DDPM U-Net costs 3.4x the
# report's per step on 2 CPU cores (284 against 965 images/s at batch 64), so it gets 880 steps: the same
# training time as the quick preset's 3,000. The learned variance adds under 5% per step and keeps 3,000.
REPORT_UNET = ("quick", None, ())  # the quick preset: the unconditional cpu-preset network, 3,000 steps
LEARNED_VARIANCE = ("quick", None, ("model.learn_variance=True",))
DDPM_UNET = ("ddpm", 880, ())

# (name, training setup, evaluation flags, likelihood flags or None for "same network as the row above")
VARIANTS = [
    ("report U-Net, raw weights, 100 ancestral steps (the baseline)", REPORT_UNET, ("--weights", "raw"),
     ("--weights", "raw")),
    ("+ EMA weights", REPORT_UNET, ("--weights", "ema"), ("--weights", "ema")),
    ("+ EMA, respaced to 10 ancestral steps", REPORT_UNET, ("--steps", "10"), None),
    ("+ EMA, DDIM 10 steps", REPORT_UNET, ("--steps", "10", "--method", "ddim"), None),
    ("+ EMA + learned variance (L_hybrid), 100 steps", LEARNED_VARIANCE, (), ()),
    ("+ EMA + learned variance, respaced to 10 steps", LEARNED_VARIANCE, ("--steps", "10"), None),
    ("DDPM U-Net (same training time) + EMA, 100 steps", DDPM_UNET, (), ()),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/compare", help="where the runs and the table go (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--idx-dir", default=None, help="read MNIST from the standard IDX files in this folder")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps for every run (default: each setup's own; for a quick smoke test)")
    p.add_argument("--num-samples", type=int, default=10_000, help="samples per FID (default: %(default)s)")
    p.add_argument("--nll-images", type=int, default=10_000, help="test images for bits/dim (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    curves = p.add_argument_group("loss curves of existing runs (nothing trained)")
    curves.add_argument("--curves", nargs="+", metavar="RUN", default=None,
                        help="run folders whose loss curves (metrics.jsonl) to draw on one figure, then stop")
    curves.add_argument("--labels", nargs="+", default=None, help="one legend label per --curves run "
                        "(default: the folders' names)")
    curves.add_argument("--out", default="loss_compare.png", help="the figure --curves writes (default: %(default)s)")
    return p.parse_args(argv)


def draw_curves(runs: list[str], labels: list[str] | None, out: str) -> int:
    """``--curves``: the runs' loss curves on one figure; returns the exit status."""
    if labels is not None and len(labels) != len(runs):
        print(f"error: --labels gives {len(labels)} labels for {len(runs)} --curves runs; give one per run.",
              file=sys.stderr)
        return 2
    labels = labels or [Path(run).resolve().name for run in runs]
    if len(set(labels)) != len(labels):
        print(f"error: two runs share the label {labels!r}; name them with --labels.", file=sys.stderr)
        return 2
    try:
        write_loss_plot(dict(zip(labels, runs)), out)
    except FileNotFoundError as e:
        print(f"error: {e.filename} not found: --curves takes run folders (with config.json and metrics.jsonl).",
              file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _train_images_per_s(run: Path) -> float | None:
    rates = [r["images_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("images_per_s")]
    return statistics.median(rates) if rates else None


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    if args.curves:
        return draw_curves(args.curves, args.labels, args.out)
    root = Path(args.workdir)
    data_flags = (["--idx-dir", args.idx_dir] if args.idx_dir else []) + (
        ["--data-dir", args.data_dir] if args.data_dir else [])
    quiet = ["--no-progress"] if args.no_progress else []
    try:
        images, _ = data_lib.load_mnist("train", data_dir=args.data_dir, idx_dir=args.idx_dir)
    except (data_lib.DatasetNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    runs: dict[tuple, Path] = {}
    rows = []
    for name, setup, eval_flags, nll_flags in VARIANTS:
        if setup not in runs:  # one training run per distinct training setup
            preset, steps, overrides = setup
            run = root / f"run{len(runs)}"
            config = configs_lib.get_config(preset)
            for assignment in overrides:
                apply_override(config, assignment)
            config.train.num_steps = args.steps or steps or config.train.num_steps
            print(f"== training {run}: preset {preset}, {config.train.num_steps} steps "
                  f"{' '.join(overrides)}", flush=True)
            train_lib.train_and_evaluate(config, str(run), images=images, progress=not args.no_progress)
            runs[setup] = run
        run = runs[setup]
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        measured = root / "measurements" / f"{slug}.json"
        if measured.exists():
            rows.append(json.loads(measured.read_text()))
            continue
        print(f"== {name}", flush=True)
        if evaluate.main(["--workdir", str(run), *data_flags, "--num-samples", str(args.num_samples),
                          *eval_flags, *quiet]) != 0:
            return 1
        result = json.loads((run / "eval.json").read_text())
        row = {"variant": name, "run": str(run), "training": {"preset": setup[0], "steps": setup[1],
                                                               "overrides": list(setup[2])},
               "evaluation": list(eval_flags),
               "fid": result["fid"], "fid_floor": result["fid_floor"], "kl_to_uniform": result["kl_to_uniform"],
               "unreadable_rate": result["unreadable_rate"], "samples_per_s": result["sampling"]["samples_per_s"],
               "train_images_per_s": _train_images_per_s(run), "bits_per_dim": None}
        if nll_flags is not None:
            if likelihood.main(["--workdir", str(run), *data_flags, "--num-images", str(args.nll_images),
                                *nll_flags, *quiet]) != 0:
                return 1
            nll = json.loads((run / "likelihood.json").read_text())
            row["bits_per_dim"], row["bits_per_dim_stderr"] = nll["bits_per_dim"], nll["stderr"]
        measured.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "eval.json", measured.with_suffix(".eval.json"))
        measured.write_text(json.dumps(row, indent=2))
        rows.append(row)

    (root / "compare.json").write_text(json.dumps(rows, indent=2))
    write_loss_plot({f"{setup[0]} {' '.join(setup[2])}".strip(): str(run) for setup, run in runs.items()},
                    str(root / "loss_curves.png"))
    lines = ["| variant | FID (floor) | KL to uniform | unreadable | bits/dim | samples/s | train img/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        bpd = f"{r['bits_per_dim']:.3f}" if r["bits_per_dim"] is not None else "same network"
        sps = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "-"
        ips = f"{r['train_images_per_s']:.0f}" if r["train_images_per_s"] else "-"
        lines.append(f"| {r['variant']} | {r['fid']:.1f} ({r['fid_floor']:.2f}) | {r['kl_to_uniform']:.3f} | "
                     f"{r['unreadable_rate']:.1%} | {bpd} | {sps} | {ips} |")
    table = "\n".join(lines) + "\n"
    (root / "compare.md").write_text(table)
    print(table)
    print(f"wrote {root}/compare.json, compare.md and loss_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
