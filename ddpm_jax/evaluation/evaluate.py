"""Evaluate a trained model: draw samples, measure them, compare with real data, plot.

The machinery behind ``ddpm-jax-evaluate`` (:mod:`ddpm_jax.cli.evaluate`); the metrics
themselves are the pure functions of :mod:`ddpm_jax.evaluation.metrics`.

- :func:`draw_samples`: ``n`` samples as uint8, batch by batch, each finished
  batch saved to disk so a killed evaluation resumes where it stopped.
- :func:`measure`: FID against reference features, the digit histogram, KL to
  uniform, the unreadable rate, precision and recall.
- :func:`sample_and_measure`: both for one checkpoint, with its BatchNorm statistics as
  trained or recalibrated (:mod:`ddpm_jax.evaluation.batchnorm_stats`).
- :func:`cached_features`: feature-network activations of a real image set,
  cached per (network, images) so the reference statistics are computed once.
- :func:`save_histogram_plot`, :func:`save_least_confident`: the PNGs.
- :func:`negative_log_likelihood`: the variational bound in bits per dimension
  over a set of real images (:mod:`ddpm_jax.diffusion.likelihood`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from ddpm_jax.data import fingerprint, pad_to_batch, preprocess
from ddpm_jax.diffusion.likelihood import bits_per_dim, vlb_terms
from ddpm_jax.evaluation import metrics, plotting
from ddpm_jax.evaluation.batchnorm_stats import recalibrate_batch_stats
from ddpm_jax.evaluation.feature_network import FeatureNetwork
from ddpm_jax.sampling.denoiser import denoiser_fn
from ddpm_jax.sampling.generate import sample
from ddpm_jax.sampling.options import resolve_variance
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.utils import cache
from ddpm_jax.utils.progress import progress_bar


def chunk_path(chunk_dir: str | os.PathLike, batch_index: int) -> Path:
    """Where :func:`draw_samples` keeps batch ``batch_index`` of a resumable draw."""
    return Path(chunk_dir) / f"batch_{batch_index:05d}.npy"


def draw_samples(
    checkpoint: DiffusionCheckpoint,
    key: jax.Array,
    n: int,
    *,
    batch_size: int,
    chunk_dir: str | os.PathLike | None = None,
    progress: bool = False,
    labels: np.ndarray | None = None,
    **sample_kwargs,
) -> np.ndarray:
    """``n`` samples as uint8 ``(n, H, W, C)`` (MNIST ``(n, 28, 28, 1)``), quantized as a saved PNG would be.

    Batch ``b`` is ``sample(checkpoint, fold_in(key, b), batch_size)``, so the
    result depends only on ``(key, batch_size)``, not on how often the call
    was interrupted. With ``chunk_dir`` each finished batch is written there
    (atomically) and batches already there are loaded instead of drawn again.
    ``labels`` (int ``(n,)``): the digit each sample is asked to be (see
    :func:`ddpm_jax.sample`); batch ``b`` gets its slice of them.
    """
    num_batches = -(-n // batch_size)
    if chunk_dir is not None:
        chunk_dir = Path(chunk_dir)
        chunk_dir.mkdir(parents=True, exist_ok=True)
    batches = range(num_batches)
    bar = None
    if progress:
        bar = progress_bar(total=n, unit="sample", desc=f"sampling {n:,}")
    out = []
    for b in batches:
        path = chunk_path(chunk_dir, b) if chunk_dir is not None else None
        if path is not None and path.exists():
            images = np.load(path)
        else:
            batch_labels = None
            if labels is not None:  # the last batch is padded by repeating its labels, then cropped
                batch_labels = pad_to_batch(np.asarray(labels)[b * batch_size:(b + 1) * batch_size], batch_size)
            images = plotting.to_uint8(sample(checkpoint, jax.random.fold_in(key, b), batch_size,
                                              batch_size=batch_size, labels=batch_labels, **sample_kwargs))
            if path is not None:
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, images)
                os.replace(tmp, path)
        out.append(images)
        if bar is not None:
            bar.update(min(batch_size, n - b * batch_size))
    if bar is not None:
        bar.close()
    return np.concatenate(out)[:n]


def cached_features(
    network: FeatureNetwork, images_u8: np.ndarray, cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, features)`` of a real image set, cached under the network's name and the images' hash."""
    directory = Path(cache_dir or cache.cache_dir()).expanduser() / "features"
    path = directory / f"{network.name}-{fingerprint(images_u8)}.npz"
    if network.name != "uncached" and path.exists():
        with np.load(path) as cached:
            return cached["probs"], cached["features"]
    probs, features = network(images_u8)
    if network.name != "uncached":
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, probs=probs, features=features)
        os.replace(tmp, path)
    return probs, features


def real_image_floor(network: FeatureNetwork, train_images: np.ndarray, n: int, reference_features: np.ndarray,
                     cache_dir: str | os.PathLike | None = None, **measure_kwargs) -> tuple[dict, np.ndarray, np.ndarray]:
    """What a perfect model scores at ``n`` samples: :func:`measure` of ``n`` real training images.

    The images are a fixed random subset (seed 0, at most all of them), so every evaluation
    at the same ``n`` compares against the same floor. Returns ``(metrics, indices, probs)``:
    the subset's indices into ``train_images`` and its class probabilities.
    """
    n = min(n, len(train_images))
    indices = np.sort(np.random.default_rng(0).permutation(len(train_images))[:n])
    probs, features = cached_features(network, train_images[indices], cache_dir)
    return measure(probs, features, reference_features, **measure_kwargs), indices, probs


NUM_RESAMPLES = 100  # bootstrap resamples behind every spread measure() reports
# What a table of several image sets quotes of each measure(): the numbers, with their spreads.
SUMMARY_METRICS = ("fid", "fid_std", "kid", "kid_std", "unreadable_rate", "unreadable_rate_std", "kl_to_uniform",
                   "precision", "recall")


def measure(
    probs: np.ndarray,
    features: np.ndarray,
    reference_features: np.ndarray,
    *,
    threshold: float = metrics.UNREADABLE_THRESHOLD,
    precision_recall: bool = True,
    spread: bool = True,
    seed: int = 0,
    kid_subsets: int = 100,
) -> dict:
    """All metrics of one image set from its classifier outputs, against reference features.

    Returns a JSON-ready dict: ``fid``, ``histogram`` (digit -> count, every
    sample counted by its most likely digit), ``kl_to_uniform`` (nats),
    ``unreadable_rate``, ``unreadable_histogram`` (the unreadable samples by
    their most likely digit), ``unreadable_rate_at`` (the rate at other
    thresholds, to see how much the choice matters), ``precision``,
    ``recall`` (None with 3 or fewer images on a side: too few for their 3 nearest neighbours),
    ``num_samples``. With ``spread``: ``fid_std`` and ``unreadable_rate_std``, the standard deviations
    of both over :data:`NUM_RESAMPLES` bootstrap resamples of the samples (the reference held fixed;
    ``seed`` picks the resamples), and ``kid`` and ``kid_std`` (:func:`metrics.kid` over ``kid_subsets``
    subsets; None with fewer than 2 images on a side).
    """
    labels = probs.argmax(axis=-1)
    num_classes = probs.shape[-1]
    unreadable = metrics.unreadable_mask(probs, threshold)
    counts = metrics.digit_histogram(labels, num_classes)
    reference = metrics.gaussian_statistics(reference_features)
    result = {
        "num_samples": len(features),
        "fid": metrics.frechet_distance(*metrics.gaussian_statistics(features), *reference),
        "histogram": {str(d): int(c) for d, c in enumerate(counts)},
        "kl_to_uniform": metrics.kl_to_uniform(counts),
        "unreadable_rate": float(unreadable.mean()),
        "unreadable_histogram": {str(d): int(c) for d, c in
                                 enumerate(metrics.digit_histogram(labels[unreadable], num_classes))},
        "unreadable_rate_at": {str(t): float(metrics.unreadable_mask(probs, t).mean()) for t in (0.5, 0.7, 0.9, 0.99)},
    }
    if spread:
        n = len(features)
        fids = metrics.bootstrap(
            lambda i: metrics.frechet_distance(*metrics.gaussian_statistics(features[i]), *reference), n,
            num_resamples=NUM_RESAMPLES, seed=seed)
        rates = metrics.bootstrap(lambda i: unreadable[i].mean(), n, num_resamples=NUM_RESAMPLES, seed=seed)
        result["fid_std"] = float(fids.std(ddof=1))
        result["unreadable_rate_std"] = float(rates.std(ddof=1))
        enough = min(len(reference_features), n) >= 2
        result["kid"], result["kid_std"] = (
            metrics.kid(features, reference_features, num_subsets=kid_subsets, seed=seed) if enough else (None, None))
    if precision_recall:
        # k = 3 nearest neighbours need more than 3 points a side (a small folder's held-out split may have fewer).
        enough = min(len(reference_features), len(features)) > 3
        result["precision"], result["recall"] = (metrics.precision_recall(reference_features, features) if enough
                                                 else (None, None))
    return result


def sample_and_measure(
    checkpoint: DiffusionCheckpoint,
    network: FeatureNetwork,
    reference_features: np.ndarray,
    n: int,
    key: jax.Array,
    *,
    batch_size: int,
    batchnorm: str = "running",
    train_images: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    threshold: float = metrics.UNREADABLE_THRESHOLD,
    progress: bool = False,
    **sample_kwargs,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Draw ``n`` samples of ``checkpoint`` (:func:`draw_samples` with ``key``) and :func:`measure` them.

    ``batchnorm``: ``'running'`` or ``'batch'`` as :func:`ddpm_jax.sample` takes it, or
    ``'recalibrated'``: the statistics recomputed for the sampling weights over ``train_images``
    (and ``train_labels`` for a class-conditional network) first
    (:func:`ddpm_jax.evaluation.batchnorm_stats.recalibrate_batch_stats`, with a key folded from ``key``).
    Returns ``(metrics, samples, probs)``: :func:`measure`'s dict plus ``sampling_seconds`` (the
    recalibration included), the uint8 samples ``(n, H, W, C)`` and their class probabilities.
    """
    start = time.perf_counter()
    if batchnorm == "recalibrated":
        if train_images is None:
            raise ValueError("batchnorm='recalibrated' needs train_images to recompute the statistics over.")
        conditional = int(checkpoint.config.model.get("num_classes", 0)) > 0
        checkpoint = recalibrate_batch_stats(checkpoint, train_images, jax.random.fold_in(key, 2**31 - 1),
                                             labels=train_labels if conditional else None)
        batchnorm = "running"
    samples = draw_samples(checkpoint, key, n, batch_size=min(batch_size, n), progress=progress,
                           batchnorm=batchnorm, **sample_kwargs)
    seconds = time.perf_counter() - start
    probs, features = network(samples)
    return {**measure(probs, features, reference_features, threshold=threshold), "sampling_seconds": seconds}, \
        samples, probs


def least_confident(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` samples with the lowest top-class probability, least confident first."""
    return np.argsort(probs.max(axis=-1), kind="stable")[:k]


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def as_text(name: str) -> str:
    """``name`` as matplotlib draws it literally: a ``$`` escaped, so a class folder named ``$x^$`` is a label,
    not math text that fails to parse when the figure is drawn."""
    return str(name).replace("$", r"\$")


def save_histogram_plot(result: dict, path: str, floor: dict | None = None, title: str = "",
                        class_names: tuple[str, ...] | None = None) -> None:
    """Bar chart of the class histogram (the report's Figure 6: digits), unreadable samples hatched.

    ``floor`` (the same metrics for real data) is drawn as outlined bars for comparison;
    ``class_names`` label the bars (default: the digits 0..9).
    """
    digits = np.arange(len(result["histogram"]))
    n = result["num_samples"]
    share = np.array([result["histogram"][str(d)] for d in digits]) / n * 100
    unreadable = np.array([result["unreadable_histogram"][str(d)] for d in digits]) / n * 100
    fig = Figure(figsize=(7, 4.2), dpi=120)  # no pyplot: nothing global (a notebook's backend) is touched
    ax = fig.subplots()
    ax.bar(digits, share - unreadable, width=0.7, color="#4c72b0", label="samples (readable)")
    ax.bar(digits, unreadable, width=0.7, bottom=share - unreadable, color="#c4d3ea", hatch="///",
           edgecolor="#4c72b0", label=f"unreadable (top probability < {result.get('unreadable_threshold', metrics.UNREADABLE_THRESHOLD)})")
    if floor is not None:
        real = np.array([floor["histogram"][str(d)] for d in digits]) / floor["num_samples"] * 100
        ax.bar(digits, real, width=0.86, fill=False, edgecolor="#dd8452", linewidth=1.5, label="real training images")
    uniform = 100 / len(digits)
    ax.axhline(uniform, color="0.4", linestyle="--", linewidth=1, label=f"uniform ({uniform:.3g}%)")
    for d, s in zip(digits, share):
        ax.text(d, s + 0.4, f"{s:.1f}", ha="center", va="bottom", fontsize=7)
    if class_names is None:
        ax.set_xticks(digits)
        ax.set_xlabel("digit (the classifier's most likely label)")
    else:
        ax.set_xticks(digits, [as_text(n) for n in class_names], rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("class (the classifier's most likely label)")
    ax.set_ylabel(f"% of {n:,} samples")
    ax.set_ylim(0, max(share.max(), uniform) * 1.25)
    ax.set_title(title or f"KL to uniform {result['kl_to_uniform']:.4f} nats, unreadable {result['unreadable_rate']:.1%}",
                 fontsize=9)
    # Below the x label: further down when rotated class names sit between them.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16 if class_names is None else -0.36), ncol=2,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def save_histogram_beside(result: dict, reference: dict[str, int], path: str, title: str = "",
                          reference_label: str = "the report's Figure 6") -> None:
    """Per 100 samples: each digit's readable samples and the unreadable ones ('?'), beside another count of the
    same form (``reference``: digit or '?' -> count, e.g. the report's 100 samples counted by eye)."""
    names = [*result["histogram"], "?"]
    n = result["num_samples"]
    unreadable = result["unreadable_histogram"]
    ours = [(result["histogram"][d] - unreadable[d]) / n * 100 for d in names[:-1]] + [result["unreadable_rate"] * 100]
    theirs = np.array([reference.get(d, 0) for d in names], float)
    theirs = theirs / theirs.sum() * 100
    x = np.arange(len(names))
    fig = Figure(figsize=(7, 3.6), dpi=120)
    ax = fig.subplots()
    ax.bar(x - 0.2, theirs, width=0.4, color="#dd8452", label=reference_label)
    ax.bar(x + 0.2, ours, width=0.4, color="#4c72b0", label=f"ours ({n:,} samples, per 100)")
    for xi, value in zip(x, ours):
        ax.text(xi + 0.2, value + 0.4, f"{value:.1f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, names)
    ax.set_xlabel("digit the sample reads as ('?': unreadable)")
    ax.set_ylabel("per 100 samples")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def save_learning_curve(curve: dict, path: str) -> None:
    """FID and the unreadable rate against images seen (log axis), one line per measured setting, with the
    real-data floor; ``curve`` as :mod:`experiments.learning_curve` writes it."""
    fig = Figure(figsize=(9, 3.6), dpi=120)
    ax_fid, ax_unreadable = fig.subplots(1, 2)
    settings = [m["setting"] for m in curve["points"][0]["measurements"]]
    for setting in settings:
        rows = [(p["images_seen"], m) for p in curve["points"] for m in p["measurements"] if m["setting"] == setting]
        xs = [x for x, _ in rows]
        ax_fid.plot(xs, [m["fid"] for _, m in rows], marker="o", label=setting)
        ax_unreadable.plot(xs, [m["unreadable_rate"] * 100 for _, m in rows], marker="o", label=setting)
    floor = curve["floor"]
    ax_fid.axhline(floor["fid"], color="0.4", linestyle="--", linewidth=1, label="real images (floor)")
    ax_unreadable.axhline(floor["unreadable_rate"] * 100, color="0.4", linestyle="--", linewidth=1,
                          label="real images")
    for ax, label in ((ax_fid, "FID"), (ax_unreadable, "unreadable (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("training images seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_fid.set_yscale("log")
    ax_fid.legend(fontsize=6, frameon=False)
    fig.suptitle(f"{curve['preset']} preset, {curve['num_samples']:,} samples per point", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def save_least_confident(images_u8: np.ndarray, probs: np.ndarray, path: str, k: int = 64, ncol: int = 8,
                         class_names: tuple[str, ...] | None = None) -> None:
    """Grid of the ``k`` least confident samples, each titled with its likeliest class (``class_names``;
    default the digits) and its probability."""
    order = least_confident(probs, k)
    nrow = -(-len(order) // ncol)
    fig = Figure(figsize=(ncol * 0.95, nrow * 1.1), dpi=120)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), order):
        if images_u8.shape[-1] == 1:
            ax.imshow(images_u8[i, ..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(images_u8[i])
        name = probs[i].argmax() if class_names is None else as_text(class_names[probs[i].argmax()])
        ax.set_title(f"{name}: {probs[i].max():.2f}", fontsize=7 if class_names is None else 5, pad=2)
    kind = "digit" if class_names is None else "class"
    fig.suptitle(f"least confident samples (likeliest {kind}: its probability)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_json(obj: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def negative_log_likelihood(
    checkpoint: DiffusionCheckpoint,
    images_u8: np.ndarray,
    key: jax.Array,
    *,
    batch_size: int = 250,
    variance: str | None = None,
    progress: bool = False,
) -> dict:
    """L_vlb of real images under the checkpoint's model, in bits per dimension (Ho et al. Table 2).

    ``images_u8``: uint8 ``(N, h, w, C)``, padded to the model's input size as
    in training; the dimension count D is that size squared times C. Batch ``b`` draws
    its noise from ``fold_in(key, b)``. ``variance``: the fixed reverse variance
    (default: the run's ``sampling.variance``). Returns the mean bits/dim, its
    standard error over images, and the mean of each part: the prior term L_T,
    the decoder term L_0 and the sum of the KL terms L_1..L_{T-1}.
    """
    config = checkpoint.config
    variance = resolve_variance(config, variance)
    size = config.data.image_size
    eps_fn = denoiser_fn(config.model, with_learned_variance=variance == "learned")
    schedule = checkpoint.schedule
    num_dims = size * size * images_u8.shape[-1]

    @jax.jit
    def batch_terms(variables, images, batch_key):
        terms, prior = vlb_terms(eps_fn, schedule, variables, preprocess(images, size), batch_key,
                                 variance=variance, mean_type=config.sampling.mean)
        return terms, prior

    n = len(images_u8)
    batch_size = min(batch_size, n)
    per_image, decoder, kls, priors = [], [], [], []
    batches = range(-(-n // batch_size))
    if progress:
        batches = progress_bar(batches, unit="batch", desc=f"L_vlb of {n} images")
    for b in batches:
        chunk = images_u8[b * batch_size : (b + 1) * batch_size]
        real = len(chunk)  # one compiled shape: the last batch is padded, then the padding dropped
        chunk = pad_to_batch(chunk, batch_size)
        terms, prior = jax.device_get(batch_terms(checkpoint.variables, jnp.asarray(chunk), jax.random.fold_in(key, b)))
        terms, prior = terms[:real], prior[:real]
        per_image.append(np.asarray(bits_per_dim(terms, prior, num_dims)))
        decoder.append(terms[:, 0])
        kls.append(terms[:, 1:].sum(axis=1))
        priors.append(prior)
    to_bpd = 1.0 / (num_dims * np.log(2.0))
    bpd = np.concatenate(per_image)
    return {
        "bits_per_dim": float(bpd.mean()),
        "stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else None,
        "prior_bits_per_dim": float(np.concatenate(priors).mean() * to_bpd),
        "decoder_bits_per_dim": float(np.concatenate(decoder).mean() * to_bpd),
        "kl_terms_bits_per_dim": float(np.concatenate(kls).mean() * to_bpd),
        "num_images": n,
        "num_dims": num_dims,
        "variance": variance,
        "mean": config.sampling.mean,
        "weights": checkpoint.weights_used,
        "step": checkpoint.step,
    }
