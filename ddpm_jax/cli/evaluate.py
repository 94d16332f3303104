"""Measure a trained run's samples: ``ddpm-jax-evaluate --workdir runs/mnist`` (or ``python -m experiments.evaluate``).

Loads the run's latest checkpoint, draws ``--num-samples`` samples, and
measures them in two feature spaces, each a classifier of the run's dataset of
its own architecture and training recipe (``cnn`` and ``resnet``; shipped with
the package for MNIST and Fashion-MNIST, see :mod:`ddpm_jax.evaluation.shipped`):
FID and KID against the test split, the class histogram and its KL divergence
from uniform, the unreadable rate, precision and recall, FID and the unreadable
rate with their bootstrap spread. The same metrics for real training images
against the test split are the floor a perfect model would reach. Writes
``WORKDIR/eval.json`` and ``WORKDIR/eval_{samples,histogram,least_confident}.png``
(the figures in the primary space: the CNN's for grey images, the ResNet's for RGB).

A run on a folder of images (``--image-dir``) is measured against that folder,
given again: with class subfolders, a fixed 10% of its images are held out as
the test split (the classifiers' accuracy and the FID reference), and the rest
is the training split; no network ships for it, so both are trained on first
use and cached. Without class subfolders there is no classifier to
train, so nothing here can be measured; the error says what can.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli import flags
from ddpm_jax.configs import BATCHNORM_MODES, UNCONDITIONAL_MODES
from ddpm_jax.configs.classifier import FEATURE_SPACES, primary_space
from ddpm_jax.diffusion.process import MEAN_TYPES, VARIANCE_TYPES
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.evaluation import metrics, plotting
from ddpm_jax.evaluation.batchnorm_stats import recalibrate_batch_stats
from ddpm_jax.evaluation.shipped import ShippedWeightsError, feature_networks
from ddpm_jax.sampling.options import sampling_options
from ddpm_jax.training.checkpoint import load_checkpoint
from ddpm_jax.training.workdir import WorkdirLock

PROG = "ddpm-jax-evaluate"  # the console script (pyproject.toml); `python -m experiments.evaluate` from the repository root


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's directory (its latest checkpoint is evaluated)")
    p.add_argument("--step", type=int, default=None, help="evaluate this checkpoint step instead of the latest")
    flags.add_data_flags(p)
    p.add_argument("--image-dir", default=None,
                   help="a run trained on a folder of images: the same folder (its class subfolders give the labels)")
    p.add_argument("--num-samples", type=int, default=10_000,
                   help="samples to draw and measure (default: %(default)s; FIDs are comparable only at equal counts)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per jitted sampler call (default: the run's config)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="sample with the EMA of the weights (default) or the last step's raw weights")
    flags.add_sampler_flags(p)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    p.add_argument("--variance", choices=VARIANCE_TYPES, default=None, help="sigma_t^2 (default: the run's config)")
    p.add_argument("--mean", choices=MEAN_TYPES, default=None, help="reverse-step mean (default: the run's config)")
    p.add_argument("--unconditional", choices=UNCONDITIONAL_MODES, default=None,
                   help="class-conditional runs: draw labels at the training label frequencies and guide "
                        "('label_prior'), or sample at the null label ('null'); default: the run's config")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="class-conditional runs with label_prior: classifier-free guidance w (default: the run's config)")
    p.add_argument("--batchnorm", choices=(*BATCHNORM_MODES, "recalibrated"), default=None,
                   help="BatchNorm networks: normalize with the running averages, each sampled batch's statistics, "
                        "or statistics recomputed for the sampling weights over 100 batches of noised training "
                        "images ('recalibrated', precise BN; see ddpm_jax/evaluation/batchnorm_stats.py); default: the run's config")
    p.add_argument("--threshold", type=float, default=metrics.UNREADABLE_THRESHOLD,
                   help="a sample is unreadable if no digit gets at least this probability (default: %(default)s)")
    p.add_argument("--spaces", nargs="+", choices=FEATURE_SPACES, default=list(FEATURE_SPACES),
                   help="feature spaces to measure in (default: all); the first that is the data's primary space, "
                        "else the first named, draws the figures")
    p.add_argument("--retrain-features", action="store_true",
                   help="train the feature networks on this run's training split (once; cached) instead of "
                        "loading the shipped ones: figures then comparable only with others made the same way")
    flags.add_cache_flag(p)
    flags.add_progress_flag(p)
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    if args.num_samples < 2:
        raise ValueError(f"--num-samples {args.num_samples}: need at least 2 samples to fit a Gaussian; "
                         "use 10000 for FIDs comparable with the README's.")
    if not 0.0 < args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold}: must lie in (0, 1].")
    if not np.isfinite(args.eta) or args.eta < 0:  # said as a flag, before anything is loaded
        raise ValueError(f"--eta {args.eta}: must be a finite number >= 0 (0: deterministic DDIM, 1: ancestral).")
    flags.check_sampling_flags(args)


def main(argv=None, prog: str = PROG) -> int:
    """Run the program with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv, prog)
    try:
        _check(args)
        checkpoint = load_checkpoint(args.workdir, step=args.step, weights="ema")
        checkpoint = checkpoint.with_weights(args.weights) if args.weights == "raw" else checkpoint
        # The sampler's options, checked and defaulted by the rule sample() uses (recalibrated BN is ours).
        options = sampling_options(checkpoint.config, steps=args.steps, method=args.method, eta=args.eta,
                                   variance=args.variance, mean=args.mean, order=args.order, spacing=args.spacing,
                                   batchnorm=None if args.batchnorm == "recalibrated" else args.batchnorm)
        # The data the run was trained on, as its config says: the classifier and the references are that data's.
        info, (train_images, train_labels), (test_images, test_labels) = evaluation_data(checkpoint.config, args)
    except (ValueError, FileNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    try:
        # One evaluation per workdir at a time: two would write the same sample batches and eval.json.
        with WorkdirLock(str(workdir), ".eval.lock", what="evaluating"):
            return _evaluate(args, checkpoint, options, info, train_images, train_labels, test_images, test_labels)
    except (ValueError, OSError, ShippedWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


HELD_OUT = 0.1  # of an image folder: the share held out as its test split


def evaluation_data(config, args: argparse.Namespace):
    """``(info, (train_images, train_labels), (test_images, test_labels))`` of the data a run was trained on:
    its dataset's two splits, or its image folder (``--image-dir``) split into 90% and a held-out 10%."""
    folder = flags.run_image_folder(config, args, progress=not args.no_progress)
    if folder is None:
        dataset = config.get("dataset", "mnist")
        return (data_lib.dataset_info(dataset),
                data_lib.load_dataset(dataset, "train", data_dir=args.data_dir, idx_dir=args.idx_dir),
                data_lib.load_dataset(dataset, "test", data_dir=args.data_dir, idx_dir=args.idx_dir))
    if folder.labels is None:
        raise ValueError(
            f"{args.image_dir} has no class subfolders, so no classifier can be trained to measure samples in: FID, "
            "the class histogram, the unreadable rate and precision/recall need one. What can be measured: the "
            f"model's bits/dim on these images (python -m experiments.likelihood --workdir {args.workdir} "
            f"--image-dir {args.image_dir}), and the figures its training wrote (samples.png, reverse_process.png).")
    # As training took it: an unconditional network's fingerprint is of the images alone.
    conditional = int(config.model.get("num_classes", 0)) > 0
    made_from = data_lib.fingerprint(folder.images, *((folder.labels,) if conditional else ()))
    if config.data.get("fingerprint") and made_from != config.data.fingerprint:
        raise ValueError(f"{args.image_dir} is not the folder this run was trained on (its images' fingerprint "
                         f"{made_from}, the run's {config.data.fingerprint}); pass the same folder.")
    held_out = np.zeros(len(folder.images), bool)
    held_out[np.random.default_rng(0).permutation(len(folder.images))[:max(2, round(HELD_OUT * len(held_out)))]] = True
    info = data_lib.DatasetInfo(data_lib.IMAGE_FOLDER, str(args.image_dir), folder.class_names,
                                good_classifier_accuracy=0.0, image_shape=folder.images.shape[1:],
                                has_idx_files=False)
    return (info, (folder.images[~held_out], folder.labels[~held_out]),
            (folder.images[held_out], folder.labels[held_out]))


def _evaluate(args, checkpoint, options, info, train_images, train_labels, test_images, test_labels) -> int:
    progress = not args.no_progress
    config = checkpoint.config
    workdir = Path(args.workdir)
    print(f"evaluating {workdir} at step {checkpoint.step:,} ({config.preset} preset) on {jax.default_backend()}, "
          f"sampling with the {'EMA' if checkpoint.weights_used == 'ema' else 'raw'} weights", flush=True)

    networks = feature_networks(info.name, train_images, train_labels, test_images, test_labels,
                                spaces=list(dict.fromkeys(args.spaces)), retrain=args.retrain_features,
                                cache_dir=args.cache_dir, progress=progress, num_classes=len(info.class_names))
    primary = primary_space(info.image_shape)
    primary = primary if primary in networks else next(iter(networks))
    network = networks[primary]
    named = None if info.name == "mnist" else info.class_names  # MNIST's figures keep their digits
    for space, net in networks.items():  # a shipped network's accuracy is documented; one trained here is checked
        if not net.info.get("shipped") and net.test_accuracy < info.good_classifier_accuracy:
            print(f"warning: the '{space}' feature network reaches only {net.test_accuracy:.2%} test accuracy on "
                  f"{info.title} (< {info.good_classifier_accuracy:.0%}); its FIDs and histograms are less "
                  "trustworthy.", file=sys.stderr)
    # Per space: the test split's features (the reference), and the floor: real training images (as many as
    # samples, a fixed random subset) against the same reference.
    references = {}
    for space, net in networks.items():
        test_probs, test_features = evaluation.cached_features(net, test_images, args.cache_dir)
        floor, floor_idx, _ = evaluation.real_image_floor(net, train_images, args.num_samples, test_features,
                                                          args.cache_dir, threshold=args.threshold)
        test_floor = evaluation.measure(test_probs, test_features, test_features, threshold=args.threshold,
                                        precision_recall=False, spread=False)
        references[space] = (test_features, floor, test_floor)
    floor_n = len(floor_idx)
    test_features, floor, test_floor = references[primary]

    method = options.method  # resolved: --method, or the default for --steps
    ddim = method == "ddim"
    variance, mean = options.variance, options.mean
    steps = options.steps or config.diffusion.num_timesteps
    batch_size = min(args.batch_size or config.sampling.batch_size, args.num_samples)
    solver = method.endswith("dpm_solver++")
    order, spacing = options.order, options.spacing
    sampler_name = (f"ddim-eta{args.eta:g}" if ddim else f"{method}{options.order}" if solver
                    else f"{variance}-{mean}")
    if spacing != "linspace":
        sampler_name += f"-{spacing}"
    num_classes = int(config.model.get("num_classes", 0))
    unconditional = (args.unconditional or config.sampling.get("unconditional", "null")) if num_classes else None
    guidance_scale = None
    if unconditional == "label_prior":
        guidance_scale = config.sampling.guidance_scale if args.guidance_scale is None else args.guidance_scale
        sampler_name += f"-prior-w{guidance_scale:g}"
    elif args.guidance_scale is not None:
        print("error: --guidance-scale applies to a class-conditional run sampled with labels drawn from the "
              "label prior (--unconditional label_prior).", file=sys.stderr)
        return 2
    elif unconditional == "null":
        sampler_name += "-null"
    batchnorm = args.batchnorm or config.sampling.get("batchnorm", "running")
    if batchnorm != "running":
        sampler_name += f"-bn{batchnorm}"
    batchnorm_recalibrated = batchnorm == "recalibrated"
    # The cache of drawn batches is keyed by the checkpoint's identity (the digest of its verified files) and
    # every option that changes a sample, so a workdir whose checkpoints were replaced never reuses old samples.
    options = {"checkpoint": checkpoint.identity, "step": checkpoint.step, "weights": checkpoint.weights_used,
               "seed": args.seed, "method": method, "eta": args.eta if ddim else None, "variance": variance,
               **({"order": order} if solver else {}), **({"spacing": spacing} if spacing != "linspace" else {}),
               "mean": mean, "steps": steps, "batch_size": batch_size, "unconditional": unconditional,
               "guidance_scale": guidance_scale, "batchnorm": args.batchnorm or config.sampling.get("batchnorm", "running"),
               "recalibration_data": data_lib.fingerprint(train_images) if batchnorm_recalibrated else None}
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    chunk_dir = workdir / "eval_samples" / (f"step{checkpoint.step}-{key}-{checkpoint.weights_used}-seed{args.seed}-"
                                            f"{sampler_name}-K{steps}-batch{batch_size}")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    (chunk_dir / "options.json").write_text(json.dumps(options, indent=1, sort_keys=True))
    num_batches = -(-args.num_samples // batch_size)
    reused = sum(evaluation.chunk_path(chunk_dir, b).exists() for b in range(num_batches))
    if reused:
        print(f"reusing {reused} of {num_batches} sample batches already drawn in {chunk_dir}", flush=True)
    if batchnorm_recalibrated:
        # The key holds what the statistics are computed from, not the statistics: with every batch drawn
        # already, the 100 recalibration passes would change nothing.
        if reused < num_batches:
            checkpoint = recalibrate_batch_stats(checkpoint, train_images, jax.random.PRNGKey(args.seed),
                                                 labels=train_labels if num_classes else None)
        batchnorm = "running"  # with the recomputed statistics
    start = time.perf_counter()
    samples = evaluation.draw_samples(
        checkpoint, jax.random.PRNGKey(args.seed), args.num_samples, batch_size=batch_size, chunk_dir=chunk_dir,
        progress=progress, variance=variance, mean=mean, steps=steps, method=method,
        **({"eta": args.eta} if ddim else {}),
        **({"order": order} if solver else {}), spacing=spacing,
        **({} if unconditional is None else {"unconditional": unconditional}),
        **({} if guidance_scale is None else {"guidance_scale": guidance_scale}),
        batchnorm=batchnorm,
    )
    sampling_seconds = time.perf_counter() - start
    spaces = {}
    for space, net in networks.items():
        space_probs, space_features = net(samples)
        space_result = evaluation.measure(space_probs, space_features, references[space][0], threshold=args.threshold)
        spaces[space] = (space_probs, space_result)
    probs, result = spaces[primary]
    report = {
        "fid": result["fid"],
        "fid_floor": floor["fid"],
        "histogram": result["histogram"],
        "kl_to_uniform": result["kl_to_uniform"],
        "unreadable_rate": result["unreadable_rate"],
        "unreadable_threshold": args.threshold,
        "precision": result["precision"],
        "recall": result["recall"],
        "classifier_test_accuracy": network.test_accuracy,
        "num_samples": args.num_samples,
        "samples": result,
        "floor": {"what": f"{floor_n:,} real training images (fixed random subset) against the test split", **floor},
        "test_split": {"what": "the reference set itself: its classifier histogram and unreadable rate",
                       **{k: test_floor[k] for k in ("num_samples", "histogram", "kl_to_uniform", "unreadable_rate")}},
        "reference": {"split": "test" if info.name != data_lib.IMAGE_FOLDER else f"held out ({HELD_OUT:.0%})",
                      "num_examples": len(test_images)},
        "checkpoint": {"workdir": str(workdir), "step": checkpoint.step, "preset": config.preset,
                       "identity": checkpoint.identity},
        "sampling": {"seed": args.seed, "weights": checkpoint.weights_used, "method": method, "steps": steps,
                     **({"eta": args.eta} if ddim else {}), **({"order": order} if solver else {}),
                     "spacing": spacing, "variance": variance, "mean": mean,
                     "unconditional": unconditional, "guidance_scale": guidance_scale,
                     "batchnorm": args.batchnorm or config.sampling.get("batchnorm", "running"),
                     "batch_size": batch_size,
                     "seconds": sampling_seconds, "batches": num_batches, "reused_batches": reused,
                     "samples_per_s": None if reused else args.num_samples / sampling_seconds,
                     "chunk_dir": str(chunk_dir)},
        "dataset": info.name,
        "class_names": list(info.class_names),
        "classifier": {"path": network.info.get("path"), "test_accuracy": network.test_accuracy, "train_examples": network.info.get("train_examples"),
                       "feature_dim": network.feature_dim},
        "primary_space": primary,
        "spaces": {space: {**{k: spaces[space][1][k] for k in evaluation.SUMMARY_METRICS},
                           "floor": {k: references[space][1][k] for k in evaluation.SUMMARY_METRICS},
                           "classifier": {"name": net.name, "shipped": bool(net.info.get("shipped")),
                                          "sha256": net.info.get("sha256"), "test_accuracy": net.test_accuracy,
                                          "architecture": net.config.model.get("name", "cnn"),
                                          "feature_dim": net.feature_dim}}
                   for space, net in networks.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "jax": jax.__version__,
    }
    evaluation.write_json(report, str(workdir / "eval.json"))
    grid = min(100, args.num_samples)
    plotting.save_grid(samples[:grid].astype(np.float32) / 127.5 - 1.0, str(workdir / "eval_samples.png"), nrow=10)
    evaluation.save_histogram_plot(
        {**result, "unreadable_threshold": args.threshold}, str(workdir / "eval_histogram.png"), floor=floor,
        class_names=named,
        title=f"step {checkpoint.step:,}, {args.num_samples:,} samples: KL to uniform {result['kl_to_uniform']:.4f} "
              f"nats (real {floor['kl_to_uniform']:.4f}), unreadable {result['unreadable_rate']:.1%} "
              f"(real {floor['unreadable_rate']:.1%})",
    )
    evaluation.save_least_confident(samples, probs, str(workdir / "eval_least_confident.png"),
                                    class_names=named)

    hist = " ".join(f"{info.class_names[int(d)]}:{c}" for d, c in result["histogram"].items())
    print(format_spaces(report["spaces"], args.num_samples, info.title))
    print(f"class histogram of {args.num_samples:,} samples: {hist}")
    drawn = f"{num_batches - reused} batches drawn in {sampling_seconds:.0f} s" + (f", {reused} reused" if reused else "")
    print(f"wrote {workdir}/eval.json, eval_samples.png, eval_histogram.png, eval_least_confident.png ({drawn})")
    return 0


def _with_spread(value, std, percent: bool = False, digits: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if percent:
        return f"{value:.2%}" + ("" if std is None else f" ± {std * 100:.2f}")
    return f"{value:{digits}}" + ("" if std is None else f" ± {std:{digits}}")


def format_spaces(spaces: dict, num_samples: int, title: str) -> str:
    """The metrics of every feature space side by side, samples beside the real-image floor, each FID, KID and
    unreadable rate with its spread (one standard deviation)."""
    names = list(spaces)
    width = 20
    lines = [f"{'feature space':>24} " + " ".join(f"{n + ' (' + spaces[n]['classifier']['architecture'] + ')':^{2 * width + 1}}"
                                                 for n in names),
             f"{'classifier accuracy':>24} " + " ".join(
                 f"{format(spaces[n]['classifier']['test_accuracy'], '.2%') + ' on ' + title + ' test':^{2 * width + 1}}"
                 for n in names),
             f"{'':>24} " + " ".join(f"{'samples':>{width}} {'real (floor)':>{width}}" for _ in names)]
    rows = (("FID", lambda r: _with_spread(r["fid"], r.get("fid_std"))),
            ("KID", lambda r: _with_spread(r.get("kid"), r.get("kid_std"), digits=".3g")),
            ("unreadable rate", lambda r: _with_spread(r["unreadable_rate"], r.get("unreadable_rate_std"), True)),
            ("KL to uniform (nats)", lambda r: f"{r['kl_to_uniform']:.4f}"),
            ("precision", lambda r: "n/a" if r["precision"] is None else f"{r['precision']:.3f}"),
            ("recall", lambda r: "n/a" if r["recall"] is None else f"{r['recall']:.3f}"))
    for label, cell in rows:
        lines.append(f"{label:>24} " + " ".join(f"{cell(spaces[n]):>{width}} {cell(spaces[n]['floor']):>{width}}"
                                                 for n in names))
    lines.append(f"({num_samples:,} samples; ± one standard deviation: FID and unreadable rate over bootstrap "
                 "resamples of the samples, KID over its subsets)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
