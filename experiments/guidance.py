"""What guidance does to quality and balance: ``python -m experiments.guidance --workdir RUN --idx-dir DIR``.

``RUN`` is a class-conditional run (``python -m experiments.mnist --class-conditional``).
For every classifier-free guidance scale w of ``--scales`` it draws
``--num-samples`` samples asking for the digits 0..9 in turn, and measures them
as ``experiments.evaluate`` does (FID against the test split and its real-data
floor, the digit histogram's KL to uniform, the unreadable rate, precision and
recall) plus the **accuracy**: how often the feature classifier reads the digit
that was asked for. It also measures the same network's unconditional samples
(the null label: the report's Figure 6 question), and, with
``--classifier-run``, classifier guidance (Dhariwal & Nichol 2021) of an
unconditional run by its noise-aware classifier
(``python -m experiments.noisy_classifier``) at each scale s of
``--classifier-scales``.

Writes into ``RUN/guidance/``: ``guidance.json`` and ``guidance.md`` (the
table), ``fid_vs_accuracy.png``, ``digits_w<w>.png`` (a 10x10 grid, one row per
digit, for every w; the report's Figure 4 chosen rather than cherry-picked),
``digits_classifier_s<s>.png``, and ``unconditional_histogram.png``. Samples are
kept per variant, so a killed sweep rerun with the same flags resumes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import flags
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.evaluation import metrics, plotting
from ddpm_jax.evaluation.shipped import feature_networks
from ddpm_jax.sampling.options import sampling_options
from ddpm_jax.training.checkpoint import load_checkpoint
from ddpm_jax.training.noisy_classifier import check_classifier_matches, load_noisy_classifier

# The report's Figure 6: its 100 samples counted by eye, digits 0..9, and the "?" (not a digit) count. As
# printed they add up to 99.
REPORT_FIGURE_6 = (2, 40, 4, 10, 15, 5, 5, 11, 2, 3)
REPORT_FIGURE_6_UNREADABLE = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.guidance", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a class-conditional training run (--class-conditional)")
    flags.add_data_flags(p)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0],
                   help="classifier-free guidance scales w to sweep (default: %(default)s)")
    p.add_argument("--classifier-run", default=None,
                   help="an unconditional run holding a noise-aware classifier (RUN/noisy_classifier, from "
                        "python -m experiments.noisy_classifier): adds classifier-guidance rows")
    p.add_argument("--classifier-scales", type=float, nargs="+", default=[0.0, 1.0, 4.0, 16.0, 32.0],
                   help="classifier guidance scales s (default: %(default)s; s=0 is the unconditional run itself)")
    p.add_argument("--num-samples", type=int, default=2_000,
                   help="samples per variant, the digits asked for in turn (default: %(default)s)")
    flags.add_sampler_flags(p)
    p.add_argument("--batch-size", type=int, default=None, help="samples per jitted call (default: the run's config)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every variant (default: %(default)s)")
    flags.add_cache_flag(p)
    flags.add_progress_flag(p)
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    if args.num_samples < 10:
        raise ValueError(f"--num-samples {args.num_samples}: need at least 10 (one of each digit).")
    for flag, scales in (("--scales", args.scales), ("--classifier-scales", args.classifier_scales)):
        bad = [s for s in scales if not np.isfinite(s) or s < 0]
        if bad:
            raise ValueError(f"{flag} {bad[0]:g}: guidance scales must be finite and >= 0.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1.")


def requested_digits(n: int, num_classes: int = metrics.NUM_CLASSES) -> np.ndarray:
    """``(n,)``: 0, 1, ..., 9, 0, 1, ...: every batch of a multiple of 10 asks for each digit equally often."""
    return (np.arange(n) % num_classes).astype(np.int32)


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The share of samples whose most likely digit (by the feature classifier) is the one asked for."""
    return float(np.mean(probs.argmax(axis=-1) == labels))


def rows_by_digit(images_u8: np.ndarray, labels: np.ndarray, per_row: int = 10) -> np.ndarray:
    """The first ``per_row`` samples of each digit, digit 0's in the first row: ``(10 * per_row, 28, 28, 1)``."""
    rows = [images_u8[labels == d][:per_row] for d in range(metrics.NUM_CLASSES)]
    return np.concatenate(rows)


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(rows: list[dict], floor: dict) -> str:
    head = ("| variant | FID | accuracy (asked digit) | KL to uniform | unreadable | precision | recall | samples/s |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = [f"| {r['name']} | {r['fid']:.1f} | {_fmt(r.get('accuracy'), '.1%')} | {r['kl_to_uniform']:.3f} | "
             f"{r['unreadable_rate']:.1%} | {r['precision']:.2f} | {r['recall']:.2f} | "
             f"{_fmt(r.get('samples_per_s'), '.1f')} |" for r in rows]
    lines.append(f"| real training images (floor) | {floor['fid']:.1f} | {floor['accuracy']:.1%} | "
                 f"{floor['kl_to_uniform']:.3f} | {floor['unreadable_rate']:.1%} | {floor['precision']:.2f} | "
                 f"{floor['recall']:.2f} | – |")
    return head + "\n".join(lines) + "\n"


def figure_6_table(result: dict) -> str:
    """The report's Figure 6 next to a histogram, per 100 samples, readable samples by digit and '?'."""
    n = result["num_samples"]
    readable = [result["histogram"][str(d)] - result["unreadable_histogram"][str(d)] for d in range(10)]
    ours = [100 * c / n for c in readable]
    report_kl = metrics.kl_to_uniform(np.array(REPORT_FIGURE_6))
    kl_readable = f"{metrics.kl_to_uniform(np.array(readable)):.3f}" if sum(readable) else "– (none readable)"
    head = "| digit | " + " | ".join(map(str, range(10))) + " | ? | KL to uniform (readable) |\n"
    head += "| --- " * 13 + "|\n"
    report = "| the report (unconditional, seed U-Net) | " + " | ".join(map(str, REPORT_FIGURE_6)) + \
        f" | {REPORT_FIGURE_6_UNREADABLE} | {report_kl:.3f} |\n"
    row = "| ours (class-conditional network at the null label) | " + " | ".join(f"{x:.1f}" for x in ours) + \
        f" | {100 * result['unreadable_rate']:.1f} | {kl_readable} |\n"
    return head + report + row


def save_fid_vs_accuracy(rows: list[dict], floor: dict, path: str) -> None:
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    for kind, marker, color, label in (("classifier_free", "o", "#4c72b0", "classifier-free guidance, w"),
                                       ("classifier", "s", "#dd8452", "classifier guidance, s")):
        pts = [r for r in rows if r["kind"] == kind]
        if not pts:
            continue
        ax.plot([r["accuracy"] for r in pts], [r["fid"] for r in pts], marker=marker, color=color, label=label)
        for r in pts:
            ax.annotate(f"{r['scale']:g}", (r["accuracy"], r["fid"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color=color)
    ax.scatter([floor["accuracy"]], [floor["fid"]], marker="*", s=120, color="#55a868", label="real images (floor)",
               zorder=3)
    ax.set_xlabel("accuracy: samples read as the digit asked for")
    ax.set_ylabel("FID (classifier features, test split)")
    ax.set_title("FID against accuracy as guidance grows", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    progress = not args.no_progress
    try:
        _check(args)
        checkpoint = load_checkpoint(args.workdir)
        config = checkpoint.config
        if not config.model.get("num_classes", 0):
            raise ValueError(f"{args.workdir} holds an unconditional run (model.num_classes=0); train a "
                             "class-conditional one with python -m experiments.mnist --class-conditional.")
        # The sampler, checked and defaulted by the rule sample() uses, before any data is read.
        options = sampling_options(config, steps=args.steps, method=args.method, order=args.order,
                                   spacing=args.spacing)
        classifier_run = classifier = None
        if args.classifier_run:
            classifier_run = load_checkpoint(args.classifier_run)
            classifier = load_noisy_classifier(str(Path(args.classifier_run) / "noisy_classifier"))
            check_classifier_matches(classifier, classifier_run.config)
        train_images, train_labels = flags.load_run_split(config, "train", args)
        test_images, test_labels = flags.load_run_split(config, "test", args)
    except (ValueError, FileNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.workdir) / "guidance"
    out.mkdir(parents=True, exist_ok=True)
    print(f"guidance sweep of {args.workdir} (step {checkpoint.step:,}, {config.preset} preset, EMA weights) on "
          f"{jax.default_backend()}: {args.num_samples:,} samples per variant", flush=True)

    network = feature_networks(config.get("dataset", "mnist"), train_images, train_labels, test_images, test_labels,
                               spaces=["cnn"], cache_dir=args.cache_dir, progress=progress)["cnn"]
    _, test_features = evaluation.cached_features(network, test_images, args.cache_dir)
    floor, floor_idx, floor_probs = evaluation.real_image_floor(network, train_images, args.num_samples,
                                                                test_features, args.cache_dir)
    floor_n = len(floor_idx)
    floor["accuracy"] = label_accuracy(floor_probs, train_labels[floor_idx])

    steps = args.steps or config.diffusion.num_timesteps
    digits = requested_digits(args.num_samples)
    variants = [("unconditional (null label)", "unconditional", None, checkpoint, {"unconditional": "null"})]
    variants += [(f"classifier-free guidance w={w:g}", "classifier_free", w, checkpoint,
                  {"labels": digits, "guidance": "classifier_free", "guidance_scale": w}) for w in args.scales]
    if classifier is not None:
        variants += [(f"classifier guidance s={s:g} (unconditional run)", "classifier", s, classifier_run,
                      {"labels": digits, "guidance": "classifier", "guidance_scale": s, "classifier": classifier})
                     for s in args.classifier_scales]

    rows = []
    for name, kind, scale, ckpt, kwargs in variants:
        batch_size = min(args.batch_size or ckpt.config.sampling.batch_size, args.num_samples)
        tag = "uncond" if kind == "unconditional" else f"{'w' if kind == 'classifier_free' else 'clf-s'}{scale:g}"
        sampler = options.method + (f"{options.order}" if options.order else "")
        sampler += "" if options.spacing == "linspace" else f"-{options.spacing}"
        chunk_dir = out / "samples" / f"{tag}-step{ckpt.step}-seed{args.seed}-{sampler}-K{steps}-batch{batch_size}"
        print(f"{name} ...", flush=True)
        timing = chunk_dir / "timing.json"
        fresh = not chunk_dir.exists() or not any(chunk_dir.glob("batch_*.npy"))
        start = time.perf_counter()
        samples = evaluation.draw_samples(ckpt, jax.random.PRNGKey(args.seed), args.num_samples,
                                          batch_size=batch_size, chunk_dir=chunk_dir, progress=progress,
                                          steps=steps, method=options.method, order=options.order,
                                          spacing=options.spacing, **kwargs)
        seconds = time.perf_counter() - start
        # Sampling speed is kept only for a draw made in one go (compile included); a resumed sweep reads it back.
        if fresh:
            timing.write_text(json.dumps({"seconds": seconds, "num_samples": args.num_samples}))
        seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
        probs, features = network(samples)
        result = evaluation.measure(probs, features, test_features)
        run = args.classifier_run if kind == "classifier" else args.workdir
        row = {"name": name, "kind": kind, "scale": scale, "workdir": run,
               "accuracy": None if kind == "unconditional" else label_accuracy(probs, digits),
               "seconds": seconds, **{k: result[k] for k in ("fid", "kl_to_uniform", "unreadable_rate",
                                                               "precision", "recall", "histogram")},
               "samples_per_s": args.num_samples / seconds if seconds else None, "result": result}
        rows.append(row)
        if kind == "unconditional":
            evaluation.save_histogram_plot(
                result, str(out / "unconditional_histogram.png"), floor=floor,
                title=f"class-conditional network at the null label, {args.num_samples:,} samples: KL to uniform "
                      f"{result['kl_to_uniform']:.4f} nats, unreadable {result['unreadable_rate']:.1%}")
        else:
            per_row = min(10, args.num_samples // metrics.NUM_CLASSES)
            grid = rows_by_digit(samples, digits, per_row)
            png = f"digits_w{scale:g}.png" if kind == "classifier_free" else f"digits_classifier_s{scale:g}.png"
            plotting.save_grid(grid.astype(np.float32) / 127.5 - 1.0, str(out / png), nrow=per_row)
        print(f"  FID {result['fid']:.2f}, accuracy {_fmt(row['accuracy'], '.1%')}, KL {result['kl_to_uniform']:.4f}, "
              f"unreadable {result['unreadable_rate']:.1%}, "
              f"{'sampled in ' + format(seconds, '.0f') + ' s' if seconds else 'samples read back'}", flush=True)

    table = markdown_table(rows, floor)
    fig6 = figure_6_table(rows[0]["result"])
    (out / "guidance.md").write_text(
        f"Guidance sweep of `{args.workdir}` (step {checkpoint.step:,}), {args.num_samples:,} samples per row, "
        f"{options.method} sampling in {steps} steps, seed {args.seed}; FID floor at this sample count "
        f"{floor['fid']:.2f}.\n\n{table}\nUnconditional samples (null label) next to the report's Figure 6, per "
        f"100 samples:\n\n{fig6}")
    save_fid_vs_accuracy([r for r in rows if r["accuracy"] is not None], floor, str(out / "fid_vs_accuracy.png"))
    evaluation.write_json({
        "rows": [{k: v for k, v in r.items() if k != "result"} | {"metrics": r["result"]} for r in rows],
        "floor": {"what": f"{floor_n:,} real training images against the test split", **floor},
        "num_samples": args.num_samples, "steps": steps, "method": options.method, "seed": args.seed,
        "checkpoint": {"workdir": args.workdir, "step": checkpoint.step, "preset": config.preset},
        "classifier_run": args.classifier_run,
        "feature_classifier_test_accuracy": network.test_accuracy,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "jax": jax.__version__,
    }, str(out / "guidance.json"))
    print(table)
    print(fig6)
    print(f"wrote {out}/guidance.json, guidance.md, fid_vs_accuracy.png, digits_w*.png, unconditional_histogram.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
