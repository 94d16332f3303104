"""Sample quality against network calls, per sampler and step spacing: ``python -m experiments.solvers --workdir RUN``.

For every sampler of ``--methods`` (ancestral, DDIM, DPM-Solver++ ...), every spacing of
``--spacings`` and every number of network calls K of ``--calls``, draws ``--num-samples``
samples as ``sample(checkpoint, key, n, steps=K, method=..., spacing=...)`` does (the run's
own defaults otherwise: a class-conditional run draws labels at the training frequencies and
guides them at its ``sampling.guidance_scale``; the doubled batch of classifier-free guidance
counts as one call), and measures them as ``experiments.evaluate`` does, in both feature spaces:
FID and KID against the test split, the unreadable rate, KL of the class histogram to uniform,
precision and recall, FID and the unreadable rate with their bootstrap spread. K = T (all the
network's timesteps) is drawn once per method: spacing does not apply there.

Each row is also compared with all T ancestral steps (when that row is in the table): its FID as a
ratio of theirs and its unreadable rate as a difference, in each space; a row **meets the goal**
when its FID is within 15% of theirs and its unreadable rate within 1 point, in every space.

Writes into ``RUN/solvers/`` (or ``--out``): ``solvers.json`` (every row, the floors, the setup),
``solvers.md`` (the table) and ``fid_vs_calls.png`` (one panel per space). Samples are kept per variant, so a killed run rerun with
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
from ddpm_jax.configs.classifier import primary_space
from ddpm_jax.diffusion.schedules import SPACINGS
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.evaluation.shipped import ShippedWeightsError, feature_networks
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
    p.add_argument("--out", default=None,
                   help="where the table, JSON and plot go (default: RUN/solvers; the samples stay in "
                        "RUN/solvers/samples, shared by every table)")
    p.add_argument("--kid-subsets", type=int, default=20,
                   help="subsets KID is averaged over (default: %(default)s; the evaluation's 100 cost a minute a row)")
    p.add_argument("--retrain-features", action="store_true",
                   help="train the feature networks on the run's training split instead of loading the shipped ones")
    flags.add_cache_flag(p)
    flags.add_progress_flag(p)
    return p.parse_args(argv)


GOAL_FID_RATIO = 1.15  # a few-step sampler's FID at most this many times all T ancestral steps' ...
GOAL_UNREADABLE_POINTS = 0.01  # ... and its unreadable rate at most this much above theirs, in every space
METRICS = evaluation.SUMMARY_METRICS


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


def _reference(rows: list[dict]) -> dict | None:
    """The row of all T ancestral steps, if the table has it."""
    return next((r for r in rows if r["method"] == "ancestral" and r["full"]), None)


def compare_with_reference(rows: list[dict]) -> list[dict]:
    """Each row with, per space, its FID over the reference's (``fid_ratio``, with ``fid_ratio_std`` from both
    spreads), its unreadable rate minus the reference's (``unreadable_diff``), and ``meets_goal``: within
    :data:`GOAL_FID_RATIO` and :data:`GOAL_UNREADABLE_POINTS` in every space. Unchanged without a reference."""
    reference = _reference(rows)
    if reference is None:
        return rows
    out = []
    for row in rows:
        spaces = {}
        for space, m in row["spaces"].items():
            ref = reference["spaces"][space]
            ratio = m["fid"] / ref["fid"]
            ratio_std = ratio * ((m["fid_std"] / m["fid"]) ** 2 + (ref["fid_std"] / ref["fid"]) ** 2) ** 0.5
            spaces[space] = {**m, "fid_ratio": ratio, "fid_ratio_std": ratio_std,
                             "unreadable_diff": m["unreadable_rate"] - ref["unreadable_rate"]}
        meets = all(v["fid_ratio"] <= GOAL_FID_RATIO and v["unreadable_diff"] <= GOAL_UNREADABLE_POINTS
                    for v in spaces.values())
        out.append({**row, "spaces": spaces, "meets_goal": meets})
    return out


def save_plot(rows: list[dict], floors: dict, path: str) -> None:
    """FID against network calls, one line per (sampler, spacing), log-scaled calls; one panel per feature space."""
    names = list(floors)
    fig = Figure(figsize=(6.5 * len(names), 4.6), dpi=120)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    styles = {"linspace": "-", "trailing": "--", "leading": ":", "logsnr": "-."}
    colours = {"ancestral": "#4c72b0", "ddim": "#dd8452", "dpm_solver++": "#55a868", "sde_dpm_solver++": "#c44e52"}
    full = {r["method"]: r for r in rows if r["full"]}
    calls = sorted({r["calls"] for r in rows})
    for ax, space in zip(axes, names):
        for (method, spacing) in dict.fromkeys((r["method"], r["spacing"]) for r in rows if not r["full"]):
            line = sorted((r for r in rows if (r["method"], r["spacing"]) == (method, spacing) and not r["full"]),
                          key=lambda r: r["calls"])
            line += [full[method]] if method in full else []
            ax.errorbar([r["calls"] for r in line], [r["spaces"][space]["fid"] for r in line],
                        yerr=[r["spaces"][space]["fid_std"] for r in line], fmt=styles.get(spacing, "-"), marker="o",
                        markersize=3, capsize=2, color=colours.get(method, "0.3"),
                        label=f"{_label(line[0])}, {spacing}")
        reference = _reference(rows)
        if reference is not None:
            ax.axhspan(0, reference["spaces"][space]["fid"] * GOAL_FID_RATIO, color="#55a868", alpha=0.08,
                       label=f"within {GOAL_FID_RATIO - 1:.0%} of all T ancestral steps")
        ax.axhline(floors[space]["fid"], color="0.5", linewidth=1, label=f"real images (floor) {floors[space]['fid']:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(calls, [str(c) for c in calls])
        ax.set_xlabel("network calls per sample")
        ax.set_ylabel(f"FID ('{space}' features, test split)")
        ax.set_title(f"'{space}' feature space", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6, ncol=2, handlelength=3.5)  # long enough to show the dashes
    fig.tight_layout()
    fig.savefig(path)


def markdown_table(rows: list[dict], floors: dict) -> str:
    """One line per row: per space FID ± its spread, its ratio to all T ancestral steps and the unreadable rate;
    then whether it meets the goal, and samples/s."""
    names = list(floors)
    head = "| sampler | spacing | calls | " + " | ".join(
        f"FID {n} | / ancestral T | unreadable {n} | KID {n}" for n in names) + " | meets goal | samples/s |"
    lines = [head, "|" + " --- |" * (3 + 4 * len(names) + 2)]

    def cells(m: dict | None) -> str:
        if m is None:
            return " | ".join(["-"] * 4)
        ratio = f"{m['fid_ratio']:.2f} ± {m['fid_ratio_std']:.2f}" if "fid_ratio" in m else "-"
        kid = "-" if m.get("kid") is None else f"{m['kid']:.3g} ± {m['kid_std']:.2g}"
        return (f"{m['fid']:.2f} ± {m['fid_std']:.2f} | {ratio} | {m['unreadable_rate']:.1%} ± "
                f"{m['unreadable_rate_std'] * 100:.1f} | {kid}")

    for r in sorted(rows, key=lambda r: (r["method"], r["spacing"], r["calls"])):
        rate = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-"
        goal = {True: "yes", False: "no"}.get(r.get("meets_goal"), "-")
        lines.append(f"| {_label(r)} | {'(all T)' if r['full'] else r['spacing']} | {r['calls']} | "
                     + " | ".join(cells(r["spaces"].get(n)) for n in names) + f" | {goal} | {rate} |")
    lines.append("| real training images (floor) | | | " + " | ".join(
        f"{floors[n]['fid']:.2f} ± {floors[n]['fid_std']:.2f} | | {floors[n]['unreadable_rate']:.1%} | "
        + ("-" if floors[n].get("kid") is None else f"{floors[n]['kid']:.3g} ± {floors[n]['kid_std']:.2g}")
        for n in names) + " | | |")
    return "\n".join(lines) + "\n"


def fewest_calls_meeting_goal(rows: list[dict]) -> dict | None:
    """The row with the fewest network calls that meets the goal (ties: the lower worst FID ratio), if any."""
    meeting = [r for r in rows if r.get("meets_goal") and not r["full"]]
    if not meeting:
        return None
    return min(meeting, key=lambda r: (r["calls"], max(m["fid_ratio"] for m in r["spaces"].values())))


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
        if args.kid_subsets < 1:
            raise ValueError(f"--kid-subsets {args.kid_subsets}: need at least 1.")
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
    samples_dir = Path(args.workdir) / "solvers" / "samples"
    out = Path(args.out) if args.out else Path(args.workdir) / "solvers"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(todo)} samplers on {args.workdir} (step {checkpoint.step:,}, {config.preset} preset, EMA weights), "
          f"{args.num_samples:,} samples each, on {jax.default_backend()}", flush=True)
    dataset = config.get("dataset", "mnist")
    info = data_lib.dataset_info(dataset)
    try:
        networks = feature_networks(dataset, train_images, train_labels, test_images, test_labels,
                                    retrain=args.retrain_features, cache_dir=args.cache_dir, progress=progress,
                                    num_classes=len(info.class_names))
    except ShippedWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    primary = primary_space(info.image_shape)
    references, floors = {}, {}
    for space, network in networks.items():
        _, references[space] = evaluation.cached_features(network, test_images, args.cache_dir)
        floor, _, _ = evaluation.real_image_floor(network, train_images, args.num_samples, references[space],
                                                  args.cache_dir)
        floors[space] = {k: floor[k] for k in (*METRICS, "num_samples")}

    setup = {"num_samples": args.num_samples, "seed": args.seed, "identity": checkpoint.identity,
             "feature_networks": {space: network.name for space, network in networks.items()}}
    rows = _earlier_rows(out / "solvers.json", setup)
    for v in todo:
        batch_size = min(args.batch_size or config.sampling.batch_size, args.num_samples)
        full = v["calls"] == num_timesteps
        tag = f"{v['method']}{v['order'] or ''}-{v['spacing']}-K{v['calls']}"
        # Batch b is drawn from fold_in(seed key, b) whatever the sample count: a larger draw of the same
        # variant reuses a smaller one's batches, and a smaller one reads the first batches of a larger one.
        chunk_dir = samples_dir / f"{tag}-step{checkpoint.step}-seed{args.seed}-batch{batch_size}"
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
        timed = json.loads(timing.read_text()) if timing.exists() else None
        rate = timed["num_samples"] / timed["seconds"] if timed else None
        spaces = {}
        for space, network in networks.items():
            probs, features = network(samples)
            result = evaluation.measure(probs, features, references[space], kid_subsets=args.kid_subsets)
            spaces[space] = {k: result[k] for k in METRICS}
        rows = [r for r in rows if _key(r) != _key(v)]
        row = {**v, "full": full, "seconds": timed["seconds"] if timed else None, "samples_per_s": rate,
               **spaces[primary], "spaces": spaces}
        rows.append(row)
        print(f"{_label(row)} {v['spacing']} K={v['calls']}: " + ", ".join(
            f"FID[{space}] {m['fid']:.2f} ± {m['fid_std']:.2f}, unreadable {m['unreadable_rate']:.1%}"
            for space, m in spaces.items()), flush=True)
        evaluation.write_json({"rows": rows, "partial": True, "setup": setup}, str(out / "solvers.json"))

    rows = compare_with_reference(rows)
    table = markdown_table(rows, floors)
    best = fewest_calls_meeting_goal(rows)
    verdict = ("no sampler in the table meets the goal" if best is None else
               f"fewest calls meeting the goal: {_label(best)}, {best['spacing']}, {best['calls']} calls")
    if _reference(rows) is None:
        verdict = "add --methods ancestral --calls T to compare each row with all T ancestral steps"
    (out / "solvers.md").write_text(
        f"Samplers on `{args.workdir}` (step {checkpoint.step:,}, {config.preset} preset), {args.num_samples:,} "
        f"samples per row, seed {args.seed}; the run's default labels and guidance. ± one standard deviation "
        f"(FID, unreadable rate: bootstrap over the samples; KID: over its subsets). Goal: FID within "
        f"{GOAL_FID_RATIO - 1:.0%} of all T ancestral steps and unreadable rate within "
        f"{GOAL_UNREADABLE_POINTS * 100:.0f} point, in every feature space; {verdict}.\n\n{table}")
    save_plot(rows, floors, str(out / "fid_vs_calls.png"))
    evaluation.write_json({
        "rows": rows, "floors": {space: {"what": f"{f['num_samples']:,} real training images against the test split",
                                         **f} for space, f in floors.items()},
        "floor": floors[primary], "primary_space": primary,
        "goal": {"fid_ratio": GOAL_FID_RATIO, "unreadable_points": GOAL_UNREADABLE_POINTS,
                 "fewest_calls": None if best is None else {k: best[k] for k in ("method", "spacing", "calls", "order")}},
        "setup": setup, "num_samples": args.num_samples, "seed": args.seed,
        "checkpoint": {"workdir": args.workdir, "step": checkpoint.step, "preset": config.preset,
                       "identity": checkpoint.identity},
        "guidance_scale": float(config.sampling.guidance_scale) if config.model.get("num_classes", 0) else None,
        "feature_networks": {space: {"name": n.name, "test_accuracy": n.test_accuracy,
                                     "shipped": bool(n.info.get("shipped"))} for space, n in networks.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "jax": jax.__version__,
    }, str(out / "solvers.json"))
    print(table)
    print(verdict)
    print(f"wrote {out}/solvers.json, solvers.md, fid_vs_calls.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
