"""Sample quality against network calls, per sampler and step spacing: ``python -m experiments.solvers --workdir RUN``.

For every sampler of ``--methods`` (ancestral, DDIM, DPM-Solver++ ...), every spacing of
``--spacings`` and every number of network calls K of ``--calls``, draws ``--num-samples``
samples as ``sample(checkpoint, key, n, steps=K, method=..., spacing=...)`` does (the run's
own defaults otherwise: a class-conditional run draws labels at the training frequencies and
guides them at its ``sampling.guidance_scale``; the doubled batch of classifier-free guidance
counts as one call), and measures them as ``experiments.evaluate`` does: FID against the test
split, the unreadable rate, KL of the class histogram to uniform, precision and recall. K = T
(all the network's timesteps) is drawn once per method: spacing does not apply there.

Writes into ``RUN/solvers/``: ``solvers.json`` (every row, the floor, the setup), ``solvers.md``
(the table) and ``fid_vs_calls.png``. Samples are kept per variant, so a killed run rerun with
the same flags resumes. Rows accumulate over runs on the same checkpoint, seed and sample count
(another combination of flags adds its rows to the table: e.g. every spacing for DPM-Solver++,
two for the others); anything else starts the table afresh.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
from matplotlib.figure import Figure

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import flags
from ddpm_jax.diffusion.schedules import SPACINGS
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.evaluation.feature_network import load_or_train_feature_network
from ddpm_jax.sampling.options import SAMPLING_METHODS, sampling_options
from ddpm_jax.training.checkpoint import load_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.solvers", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run (its latest checkpoint, EMA weights)")
    flags.add_data_flags(p)
    p.add_argument("--methods", nargs="+", choices=SAMPLING_METHODS, default=["ancestral", "ddim", "dpm_solver++"],
                   help="samplers (default: %(default)s)")
    p.add_argument("--spacings", nargs="+", choices=SPACINGS, default=list(SPACINGS),
                   help="step spacings (default: all)")
    p.add_argument("--calls", nargs="+", type=int, default=[5, 8, 10, 15, 20, 50, 100],
                   help="network calls K per sample (default: %(default)s)")
    p.add_argument("--order", type=int, default=2, help="DPM-Solver++'s order (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=5_000, help="samples per variant (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per jitted call (default: the run's config)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every variant (default: %(default)s)")
    flags.add_cache_flag(p)
    flags.add_progress_flag(p)
    return p.parse_args(argv)


def variants(methods, spacings, calls, num_timesteps: int, order: int) -> list[dict]:
    """The (method, spacing, K) to draw: K = T once per method (spacing 'linspace'), K > T dropped."""
    out = []
    for method in methods:
        for k in sorted(set(calls)):
            if k > num_timesteps:
                continue
            for spacing in (["linspace"] if k == num_timesteps else spacings):
                solver = method.endswith("dpm_solver++")
                out.append({"method": method, "spacing": spacing, "calls": k, "order": order if solver else None})
    return out


def _label(row: dict) -> str:
    name = {"ancestral": "ancestral", "ddim": "DDIM", "dpm_solver++": "DPM-Solver++",
            "sde_dpm_solver++": "SDE-DPM-Solver++"}[row["method"]]
    return name + (f"({row['order']}M)" if row["order"] else "")


def save_plot(rows: list[dict], floor: dict, path: str) -> None:
    """FID against network calls, one line per (sampler, spacing), log-scaled calls."""
    fig = Figure(figsize=(7.5, 4.6), dpi=120)
    ax = fig.subplots()
    styles = {"linspace": "-", "trailing": "--", "leading": ":", "logsnr": "-."}
    colours = {"ancestral": "#4c72b0", "ddim": "#dd8452", "dpm_solver++": "#55a868", "sde_dpm_solver++": "#c44e52"}
    full = {r["method"]: r for r in rows if r["full"]}
    for (method, spacing) in dict.fromkeys((r["method"], r["spacing"]) for r in rows if not r["full"]):
        line = sorted((r for r in rows if (r["method"], r["spacing"]) == (method, spacing) and not r["full"]),
                      key=lambda r: r["calls"])
        line += [full[method]] if method in full else []
        ax.plot([r["calls"] for r in line], [r["fid"] for r in line], styles.get(spacing, "-"), marker="o",
                markersize=3, color=colours.get(method, "0.3"), label=f"{_label(line[0])}, {spacing}")
    ax.axhline(floor["fid"], color="0.5", linewidth=1, label=f"real images (floor) {floor['fid']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    calls = sorted({r["calls"] for r in rows})
    ax.set_xticks(calls, [str(c) for c in calls])
    ax.set_xlabel("network calls per sample")
    ax.set_ylabel("FID (classifier features, test split)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, ncol=2, handlelength=3.5)  # long enough to show the dashes
    fig.tight_layout()
    fig.savefig(path)


def markdown_table(rows: list[dict], floor: dict) -> str:
    lines = ["| sampler | spacing | calls | FID | unreadable | KL to uniform | precision | recall | samples/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["method"], r["spacing"], r["calls"])):
        rate = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-"
        lines.append(f"| {_label(r)} | {'(all T)' if r['full'] else r['spacing']} | {r['calls']} | {r['fid']:.2f} | "
                     f"{r['unreadable_rate']:.1%} | {r['kl_to_uniform']:.4f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {rate} |")
    lines.append(f"| real training images (floor) | | | {floor['fid']:.2f} | {floor['unreadable_rate']:.1%} | "
                 f"{floor['kl_to_uniform']:.4f} | {floor['precision']:.3f} | {floor['recall']:.3f} | |")
    return "\n".join(lines) + "\n"


def _key(row: dict) -> tuple:
    return row["method"], row["order"], row["spacing"], row["calls"]


def _earlier_rows(path: Path, setup: dict) -> list[dict]:
    """The rows an earlier run wrote for the same checkpoint, seed and sample count (else none)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return list(earlier.get("rows", [])) if earlier.get("setup") == setup else []


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    progress = not args.no_progress
    try:
        if args.num_samples < 4:
            raise ValueError(f"--num-samples {args.num_samples}: need at least 4 (FID, precision and recall).")
        checkpoint = load_checkpoint(args.workdir)
        config = checkpoint.config
        num_timesteps = config.diffusion.num_timesteps
        todo = variants(args.methods, args.spacings, args.calls, num_timesteps, args.order)
        if not todo:
            raise ValueError(f"--calls {args.calls}: none is within 1..T={num_timesteps}.")
        for v in todo:  # every combination checked before anything is drawn, as sample() would
            sampling_options(config, steps=v["calls"], method=v["method"], order=v["order"], spacing=v["spacing"])
        train_images, train_labels = flags.load_run_split(config, "train", args)
        test_images, test_labels = flags.load_run_split(config, "test", args)
    except (ValueError, FileNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.workdir) / "solvers"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(todo)} samplers on {args.workdir} (step {checkpoint.step:,}, {config.preset} preset, EMA weights), "
          f"{args.num_samples:,} samples each, on {jax.default_backend()}", flush=True)
    network = load_or_train_feature_network(train_images, train_labels, test_images, test_labels,
                                            cache_dir=args.cache_dir, progress=progress)
    _, test_features = evaluation.cached_features(network, test_images, args.cache_dir)
    floor, _, _ = evaluation.real_image_floor(network, train_images, args.num_samples, test_features, args.cache_dir)

    setup = {"num_samples": args.num_samples, "seed": args.seed, "identity": checkpoint.identity}
    rows = _earlier_rows(out / "solvers.json", setup)
    for v in todo:
        batch_size = min(args.batch_size or config.sampling.batch_size, args.num_samples)
        full = v["calls"] == num_timesteps
        tag = f"{v['method']}{v['order'] or ''}-{v['spacing']}-K{v['calls']}"
        chunk_dir = out / "samples" / f"{tag}-step{checkpoint.step}-seed{args.seed}-batch{batch_size}"
        timing = chunk_dir / "timing.json"
        fresh = not chunk_dir.exists() or not any(chunk_dir.glob("batch_*.npy"))
        start = time.perf_counter()
        samples = evaluation.draw_samples(
            checkpoint, jax.random.PRNGKey(args.seed), args.num_samples, batch_size=batch_size, chunk_dir=chunk_dir,
            progress=progress, steps=v["calls"], method=v["method"], spacing=v["spacing"],
            **({"order": v["order"]} if v["order"] else {}))
        seconds = time.perf_counter() - start
        if fresh:  # a draw made in one go (compile included); a resumed run reads the first timing back
            timing.write_text(json.dumps({"seconds": seconds, "num_samples": args.num_samples}))
        seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
        probs, features = network(samples)
        result = evaluation.measure(probs, features, test_features)
        rows = [r for r in rows if _key(r) != _key(v)]
        row = {**v, "full": full, "seconds": seconds,
               "samples_per_s": args.num_samples / seconds if seconds else None,
               **{k: result[k] for k in ("fid", "unreadable_rate", "kl_to_uniform", "precision", "recall")}}
        rows.append(row)
        print(f"{_label(row)} {v['spacing']} K={v['calls']}: FID {row['fid']:.2f}, unreadable "
              f"{row['unreadable_rate']:.1%}" + (f", {seconds:.0f} s" if seconds else ""), flush=True)
        evaluation.write_json({"rows": rows, "partial": True, "setup": setup}, str(out / "solvers.json"))

    table = markdown_table(rows, floor)
    (out / "solvers.md").write_text(
        f"Samplers on `{args.workdir}` (step {checkpoint.step:,}, {config.preset} preset), {args.num_samples:,} "
        f"samples per row, seed {args.seed}; the run's default labels and guidance.\n\n{table}")
    save_plot(rows, floor, str(out / "fid_vs_calls.png"))
    evaluation.write_json({
        "rows": rows, "floor": {"what": f"{floor['num_samples']:,} real training images against the test split",
                                **{k: floor[k] for k in ("fid", "unreadable_rate", "kl_to_uniform", "precision",
                                                         "recall", "num_samples")}},
        "setup": setup, "num_samples": args.num_samples, "seed": args.seed,
        "checkpoint": {"workdir": args.workdir, "step": checkpoint.step, "preset": config.preset,
                       "identity": checkpoint.identity},
        "guidance_scale": float(config.sampling.guidance_scale) if config.model.get("num_classes", 0) else None,
        "feature_classifier_test_accuracy": network.test_accuracy,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "jax": jax.__version__,
    }, str(out / "solvers.json"))
    print(table)
    print(f"wrote {out}/solvers.json, solvers.md, fid_vs_calls.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
