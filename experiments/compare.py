"""What each switch buys: ``python -m experiments.compare --idx-dir DIR --workdir runs/compare``.

Trains the CPU default once per distinct training setup (same steps, batch and
data: the same compute budget) and measures every variant with the evaluation
issue's metrics: FID (and its real-data floor), KL of the digit histogram to
uniform, the unreadable rate, the test split's negative log-likelihood bound in
bits/dim, samples/s and train images/s. Writes ``WORKDIR/compare.json`` and
``WORKDIR/compare.md`` (the README's table).

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
from ddpm_jax import data as data_lib
from ddpm_jax import train as train_lib
from experiments import evaluate, likelihood
from experiments.mnist import apply_override

# (name, training overrides as --set pairs, evaluation flags, likelihood flags or None to skip)
VARIANTS: list[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...] | None]] = [
    ("baseline: raw weights, 100 ancestral steps", (), ("--weights", "raw"), ("--weights", "raw")),
    ("+ EMA weights", (), ("--weights", "ema"), ("--weights", "ema")),
    ("+ EMA, respaced to 10 ancestral steps", (), ("--steps", "10"), None),
    ("+ EMA, DDIM 10 steps", (), ("--steps", "10", "--method", "ddim"), None),
    ("+ EMA, DDIM 25 steps", (), ("--steps", "25", "--method", "ddim"), None),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/compare", help="where the runs and the table go (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--idx-dir", default=None, help="read MNIST from the standard IDX files in this folder")
    p.add_argument("--preset", default="cpu", choices=configs_lib.PRESETS, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the preset's)")
    p.add_argument("--num-samples", type=int, default=10_000, help="samples per FID (default: %(default)s)")
    p.add_argument("--nll-images", type=int, default=10_000, help="test images for bits/dim (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _train_images_per_s(run: Path) -> float | None:
    rates = [r["images_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("images_per_s")]
    return statistics.median(rates) if rates else None


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.workdir)
    data_flags = (["--idx-dir", args.idx_dir] if args.idx_dir else []) + (
        ["--data-dir", args.data_dir] if args.data_dir else [])
    quiet = ["--no-progress"] if args.no_progress else []
    try:
        images, _ = data_lib.load_mnist("train", data_dir=args.data_dir, idx_dir=args.idx_dir)
    except (data_lib.DatasetNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    runs: dict[tuple[str, ...], Path] = {}
    rows = []
    for name, overrides, eval_flags, nll_flags in VARIANTS:
        if overrides not in runs:  # one training run per distinct training setup
            run = root / f"run{len(runs)}"
            config = configs_lib.get_config(args.preset)
            for assignment in overrides:
                apply_override(config, assignment)
            if args.steps:
                config.train.num_steps = args.steps
            print(f"== training {run} ({', '.join(overrides) or 'the preset as it is'})", flush=True)
            train_lib.train_and_evaluate(config, str(run), images=images, progress=not args.no_progress)
            runs[overrides] = run
        run = runs[overrides]
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
        row = {"variant": name, "run": str(run), "training": list(overrides), "evaluation": list(eval_flags),
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
    lines = ["| variant | FID (floor) | KL to uniform | unreadable | bits/dim | samples/s | train img/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        bpd = f"{r['bits_per_dim']:.3f}" if r["bits_per_dim"] is not None else "(same run)"
        sps = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "-"
        ips = f"{r['train_images_per_s']:.0f}" if r["train_images_per_s"] else "-"
        lines.append(f"| {r['variant']} | {r['fid']:.1f} ({r['fid_floor']:.2f}) | {r['kl_to_uniform']:.3f} | "
                     f"{r['unreadable_rate']:.1%} | {bpd} | {sps} | {ips} |")
    table = "\n".join(lines) + "\n"
    (root / "compare.md").write_text(table)
    print(table)
    print(f"wrote {root}/compare.json and compare.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
