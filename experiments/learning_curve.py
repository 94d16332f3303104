"""Train a run to several points of images seen and measure it at each: ``python -m experiments.learning_curve``.

    python -m experiments.learning_curve --preset seed --idx-dir DIR --workdir runs/seed-curve \\
        --points 1M,4M,16M --time-limit 10m

The run keeps its preset's length and learning-rate schedule (``seed``: the report's 120,000 steps at
batch 1000, 120M images): it stops at each point with a checkpoint there (as ``experiments.mnist
--stop-at``), draws ``--num-samples`` samples with the EMA weights, and measures them in the feature
classifier's space (FID against the test split, the unreadable rate, the class histogram and its KL to
uniform) with each of ``--batchnorm``'s statistics (a BatchNorm network's running averages, or
recomputed for the sampling weights: ``recalibrated``) and, for a class-conditional run, each of
``--guidance-scales``. ``--time-limit`` bounds the whole command: the training segment under way stops
when it is reached, that step is measured, and the curve ends there.

Writes ``WORKDIR/curve.json`` (rewritten after every point, with the real-data floor, images/s, what the
rest of the run would take and what a power law through the measured FIDs predicts at its end),
``curve.png`` and ``histogram.png`` (the last point's digits per 100 samples beside the report's
Figure 6). The same command resumes: training from the run's latest checkpoint, and points already
in ``curve.json`` for the same checkpoint are not measured again. Exit status: 0 done (also when the
time limit ended the curve early); 2 a bad flag, config value, dataset or workdir (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from ddpm_jax import configs as configs_lib
from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import flags
from ddpm_jax.configs.classifier import primary_space
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.evaluation.feature_network import load_or_train_feature_network
from ddpm_jax.evaluation.shipped import feature_networks
from ddpm_jax.training import train as train_lib
from ddpm_jax.training.checkpoint import load_checkpoint
from ddpm_jax.training.workdir import check_workdir, prepare_workdir
from ddpm_jax.utils import cache

# The report's Figure 6: its 100 samples by the digit the author read, '?' the unreadable ones.
REPORT_FIGURE_6 = {"0": 2, "1": 40, "2": 4, "3": 10, "4": 15, "5": 5, "6": 5, "7": 11, "8": 2, "9": 3, "?": 2}
_SCALE = {"": 1, "k": 10**3, "m": 10**6}


def images_count(text: str) -> int:
    """A point of the curve in images seen: ``250k``, ``1M``, ``1.5M`` or a plain count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"--points {text!r}: expected counts of images seen such as 1M, 250k or 4000000.")
    count = float(match.group(1)) * _SCALE[match.group(2).lower()]
    if not (math.isfinite(count) and count >= 1):
        raise ValueError(f"--points {text!r}: a count of images seen must be at least 1.")
    return int(round(count))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.learning_curve", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the run's directory (a run already there resumes)")
    p.add_argument("--preset", default="seed", choices=configs_lib.PRESETS,
                   help="config preset of a new run (default: %(default)s); a run already in --workdir keeps its own "
                        "config, to which the flags below apply")
    p.add_argument("--points", default="1M,4M,16M",
                   help="comma-separated images seen at which to measure, e.g. 1M,4M,16M; 'end' is the run's "
                        "last step (default: %(default)s)")
    p.add_argument("--time-limit", type=flags.duration_seconds, default=None, metavar="DURATION",
                   help="the whole command's time (e.g. 10m, 600s, 1.5h): training stops when it is up, and the "
                        "step reached is the curve's last point")
    p.add_argument("--num-samples", type=int, default=10_000, help="samples per measurement (default: %(default)s)")
    p.add_argument("--batchnorm", default="running,recalibrated",
                   help="BatchNorm statistics to sample with, comma-separated: running, recalibrated, batch "
                        "(default: %(default)s; networks without BatchNorm are measured once)")
    p.add_argument("--guidance-scales", default=None,
                   help="class-conditional runs: comma-separated w to measure (default: the run's config)")
    p.add_argument("--steps", type=int, default=None, help="the run's length in steps (config train.num_steps)")
    p.add_argument("--batch-size", type=int, default=None, help="config train.batch_size")
    p.add_argument("--class-conditional", action="store_true", help="a class-conditional network (as experiments.mnist)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable), as for experiments.mnist")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--classifier-epochs", type=int, default=None,
                   help="train the feature classifier this many epochs instead of its config's (smoke tests; "
                        "FIDs are comparable only under one classifier)")
    flags.add_data_flags(p)
    flags.add_cache_flag(p)
    flags.add_progress_flag(p)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """The preset with the flags applied; for a run already in ``--workdir``, its own config with them applied."""
    saved = Path(args.workdir) / "config.json"
    config = (ml_collections.ConfigDict(json.loads(saved.read_text())) if saved.is_file()
              else configs_lib.get_config(args.preset))
    if args.class_conditional:
        config.model.num_classes = 10
    for assignment in args.overrides:
        flags.apply_override(config, assignment)
    if args.steps is not None:
        config.train.num_steps = args.steps
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    size, _, channels = data_lib.dataset_info(config.dataset).image_shape
    config.data.channels, config.data.native_size = channels, size
    configs_lib.validate_config(config)
    flags.check_overrides_read(config, args.overrides)
    return config


def point_steps(points: list[str], batch_size: int, num_steps: int) -> list[int]:
    """The steps at which the curve is measured: each point's images seen at ``batch_size``, rounded up, at most
    ``num_steps``; sorted, without repeats."""
    steps = {num_steps if p.strip() == "end" else min(num_steps, -(-images_count(p) // batch_size)) for p in points}
    return sorted(steps)


def _list(text: str | None, cast=str) -> list:
    return [] if not text else [cast(v.strip()) for v in text.split(",") if v.strip()]


def power_law_prediction(points: list[dict], images: int) -> dict | None:
    """FID at ``images`` seen from a power law ``FID = a * images^b`` fitted (least squares in log-log) through the
    measured points' first measurement; None with fewer than two points. A rough guide: curves bend."""
    xs = [(p["images_seen"], p["measurements"][0]["fid"]) for p in points if p["measurements"]]
    if len(xs) < 2:
        return None
    slope, intercept = np.polyfit(np.log([x for x, _ in xs]), np.log([f for _, f in xs]), 1)
    return {"images": images, "fid": float(np.exp(intercept) * images**slope), "exponent": float(slope),
            "fitted_points": len(xs)}


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    start = time.perf_counter()
    args = parse_args(argv)
    try:
        if args.num_samples < 2:
            raise ValueError(f"--num-samples {args.num_samples}: need at least 2 samples (10000 for headline FIDs).")
        config = build_config(args)
        steps = point_steps(_list(args.points), config.train.batch_size, config.train.num_steps)
        if not steps:
            raise ValueError("--points is empty; give e.g. 1M,4M,16M.")
        modes = _list(args.batchnorm)
        for mode in modes:
            if mode not in (*configs_lib.BATCHNORM_MODES, "recalibrated"):
                raise ValueError(f"--batchnorm {mode!r}: one of running, recalibrated, batch.")
        scales = _list(args.guidance_scales, float)
        check_workdir(args.workdir)
        train_images, train_labels = data_lib.load_dataset(config.dataset, "train", data_dir=args.data_dir,
                                                           idx_dir=args.idx_dir)
        test_images, test_labels = data_lib.load_dataset(config.dataset, "test", data_dir=args.data_dir,
                                                         idx_dir=args.idx_dir)
        configs_lib.validate_config(config, num_examples=configs_lib.num_training_images(config, len(train_images)))
        prepare_workdir(args.workdir)  # once the data is read and judged: a refused run leaves nothing behind
    except (ValueError, data_lib.DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    if not jax.config.jax_compilation_cache_dir:
        # Each point's training segment builds its step anew: the persistent cache compiles it once.
        jax.config.update("jax_compilation_cache_dir", str(Path(args.cache_dir or cache.cache_dir()) / "xla"))
    num_classes = len(data_lib.dataset_info(config.dataset).class_names)
    space = primary_space(train_images.shape[1:])
    if args.classifier_epochs is None:  # the shipped network of the primary space, where one ships
        network = feature_networks(config.dataset, train_images, train_labels, test_images, test_labels,
                                   spaces=[space], cache_dir=args.cache_dir, progress=progress,
                                   num_classes=num_classes)[space]
    else:
        classifier = configs_lib.get_classifier_config(train_images.shape[1:], num_classes)
        classifier.train.num_epochs = args.classifier_epochs
        network = load_or_train_feature_network(train_images, train_labels, test_images, test_labels,
                                                cache_dir=args.cache_dir, config=classifier, progress=progress)
    test_probs, reference = evaluation.cached_features(network, test_images, args.cache_dir)
    floor, _, _ = evaluation.real_image_floor(network, train_images, args.num_samples, reference, args.cache_dir)
    test_split = evaluation.measure(test_probs, reference, reference, precision_recall=False)
    workdir = Path(args.workdir)
    out = workdir / "curve.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    done = {p["identity"]: p for p in previous.get("points", [])}
    curve = {"preset": config.preset, "batch_size": config.train.batch_size, "num_steps": config.train.num_steps,
             "num_samples": args.num_samples, "backend": jax.default_backend(),
             "device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "floor": {k: floor[k] for k in ("fid", "unreadable_rate", "kl_to_uniform", "histogram")},
             "test_split": {k: test_split[k] for k in ("unreadable_rate", "kl_to_uniform", "num_samples")},
             "classifier_test_accuracy": network.test_accuracy, "report_figure_6": REPORT_FIGURE_6,
             "points": [], "complete": False}
    labels = train_labels if int(config.model.num_classes) else None
    for step in steps:
        left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - start)
        if left is not None and left <= 0:
            break
        t0 = time.perf_counter()
        try:
            state = train_lib.train_and_evaluate(config, str(workdir), images=train_images, labels=labels,
                                                 progress=progress, stop_at=step, time_limit=left)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        train_seconds = time.perf_counter() - t0
        reached = int(state.step)
        if curve["points"] and reached <= curve["points"][-1]["step"]:
            break  # the time ran out before another step was taken
        checkpoint = load_checkpoint(str(workdir), step=reached, weights="ema")
        point = done.get(checkpoint.identity) or _measure_point(
            checkpoint, network, reference, args, modes, scales, train_images, labels, train_seconds, progress)
        curve["points"].append(point)
        curve["images_per_s"] = _images_per_s(workdir)
        evaluation.write_json(_summarize(curve, config), str(out))
        first = point["measurements"][0]
        print(f"step {reached:,} ({point['images_seen']:,} images): FID {first['fid']:.2f} (floor {floor['fid']:.2f}), "
              f"unreadable {first['unreadable_rate']:.1%}, KL {first['kl_to_uniform']:.4f} [{first['setting']}]",
              flush=True)
        if reached < step:
            break
    curve["complete"] = bool(curve["points"]) and curve["points"][-1]["step"] == steps[-1]
    curve["seconds"] = time.perf_counter() - start
    evaluation.write_json(_summarize(curve, config), str(out))
    if curve["points"]:
        evaluation.save_learning_curve(curve, str(workdir / "curve.png"))
        last = curve["points"][-1]["measurements"][0]
        evaluation.save_histogram_beside(last, REPORT_FIGURE_6, str(workdir / "histogram.png"),
                                         title=f"{curve['preset']} preset at {curve['points'][-1]['images_seen']:,} "
                                               f"images ({last['setting']}) beside the report's Figure 6")
    print(f"wrote {out}, curve.png, histogram.png ({curve['seconds'] / 60:.1f} min"
          f"{'' if curve['complete'] else ', stopped by --time-limit'})")
    return 0


def _measure_point(checkpoint, network, reference, args, modes, scales, train_images, labels, train_seconds,
                   progress) -> dict:
    """Every measurement of one checkpoint: each BatchNorm mode, and each guidance scale of a conditional run."""
    config = checkpoint.config
    has_batchnorm = bool(checkpoint.batch_stats)
    conditional = int(config.model.num_classes) > 0
    scales = (scales or [float(config.sampling.guidance_scale)]) if conditional else [None]
    settings = [(bn, w) for bn in (modes if has_batchnorm else ["running"]) for w in scales]
    measurements = []
    for batchnorm, w in settings:
        kwargs = {} if w is None else {"guidance_scale": w}
        result, _, _ = evaluation.sample_and_measure(
            checkpoint, network, reference, args.num_samples, jax.random.PRNGKey(args.seed),
            batch_size=int(config.sampling.batch_size), batchnorm=batchnorm, train_images=train_images,
            train_labels=labels, progress=progress, **kwargs)
        setting = (f"{batchnorm} BatchNorm statistics" if has_batchnorm else "no BatchNorm") + \
            ("" if w is None else f", w = {w:g}")
        measurements.append({"setting": setting, "batchnorm": batchnorm, "guidance_scale": w,
                             **{k: result[k] for k in ("fid", "unreadable_rate", "kl_to_uniform", "histogram",
                                                       "unreadable_histogram", "precision", "recall",
                                                       "num_samples", "sampling_seconds")}})
    return {"step": checkpoint.step, "images_seen": checkpoint.step * int(config.train.batch_size),
            "identity": checkpoint.identity, "train_seconds": train_seconds, "measurements": measurements}


def _images_per_s(workdir: Path) -> float | None:
    """The median training rate the run's log recorded (its lines after the first, which holds compilation)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    rates = [r.get("images_per_s") for r in map(json.loads, path.read_text().splitlines()[1:]) if r.get("images_per_s")]
    return float(np.median(rates)) if rates else None


def _summarize(curve: dict, config) -> dict:
    """``curve`` with what the rest of the run would take at the measured rate and the power law's FID at its end."""
    total = int(config.train.num_steps) * int(config.train.batch_size)
    seen = curve["points"][-1]["images_seen"] if curve["points"] else 0
    rate = curve.get("images_per_s")
    return {**curve, "total_images": total,
            "rest_of_run_hours": (total - seen) / rate / 3600 if rate else None,
            "prediction_at_end": power_law_prediction(curve["points"], total)}


if __name__ == "__main__":
    sys.exit(main())
