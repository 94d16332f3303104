"""Sample-quality metrics: pure functions of feature and probability arrays.

Everything here takes numpy arrays (features, class probabilities, labels) and
returns numbers or arrays, computed in float64; the features come from
:class:`ddpm_jax.evaluation.feature_network.FeatureNetwork`, applied to images quantized to
uint8 as a saved PNG would be.

- :func:`frechet_distance` / :func:`fid`: the Frechet distance between Gaussian
  fits of two feature sets (Heusel et al. 2017), here in the MNIST classifier's
  features rather than Inception's, so the numbers are not comparable with
  Inception FIDs, only with each other at the same sample count.
- :func:`digit_histogram`, :func:`kl_to_uniform`: which digits a model draws
  (the report's Figure 6, automated).
- :func:`unreadable_mask`: samples whose top-class probability is below
  :data:`UNREADABLE_THRESHOLD` (the report's "?" column).
- :func:`kid`: the kernel inception distance (Binkowski et al. 2018) in the same features: the
  unbiased squared MMD under a cubic polynomial kernel, averaged over subsets, with its spread.
- :func:`bootstrap`: a statistic over resamples of the samples, for the spread of FID and of the
  unreadable rate.
- :func:`precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NUM_CLASSES = 10

# A sample is "unreadable" when the classifier gives no digit at least this
# probability. The feature classifier is this unsure of 1.7% of the real MNIST
# test images (0.6% at 0.7, 4.1% at 0.99); docs/results.md shows the rate for
# real training images next to every model's.
UNREADABLE_THRESHOLD = 0.9


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64, unbiased) of ``(N, D)`` features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2, got {features.shape}.")
    mean = features.mean(axis=0)
    centred = features - mean
    return mean, centred.T @ centred / (len(features) - 1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues from rounding -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``, with
    the trace term computed as ``tr((s1^(1/2) sigma2 s1^(1/2))^(1/2))``: the
    matrix inside is symmetric PSD, so it takes real eigenvalues only and needs
    no complex ``sqrtm`` or imaginary parts to discard, and singular covariances
    (ReLU features that are always zero) are fine. Rounding can push the result
    a hair below 0 for identical inputs; it is clipped at 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}."
        )
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)))
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt, 0.0))


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two ``(N, D)`` feature sets (:func:`frechet_distance` of their Gaussian fits)."""
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(x . y / D + 1)^3`` for every row pair of ``(N, D)`` and ``(M, D)`` features: KID's kernel, ``(N, M)``."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of the squared MMD between the distributions of ``(m, D)`` ``x`` and ``(n, D)`` ``y``
    under :func:`polynomial_kernel` (Gretton et al. 2012, eq. 3): the within-set means leave out each row's
    kernel with itself, so its expectation is 0 when both come from one distribution (it can be < 0)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum(dtype=np.float64) - np.trace(kxx, dtype=np.float64)) / (m * (m - 1))
    within_y = (kyy.sum(dtype=np.float64) - np.trace(kyy, dtype=np.float64)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.sum(dtype=np.float64) / (m * n))


def kid(features1: np.ndarray, features2: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID between two ``(N, D)`` feature sets: ``(mean, std)`` of :func:`mmd2_unbiased` over ``num_subsets``
    pairs of random subsets of ``min(subset_size, N1, N2)`` rows each, drawn without replacement (the
    convention of Binkowski et al. 2018 and torch-fidelity: 100 subsets of 1,000). Unlike FID, its
    mean does not depend on the sample count, only its spread does. The kernels are computed in
    float32 (their sums in float64): twice as fast, and 1e-6 of the smallest KID that matters."""
    a = np.asarray(features1, np.float32)
    b = np.asarray(features2, np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N, D) feature sets of the same D, got {a.shape} and {b.shape}.")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 rows in each set, got {len(a)} and {len(b)}.")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, num_resamples: int = 200,
              seed: int = 0) -> np.ndarray:
    """``statistic(indices)`` for ``num_resamples`` resamples of ``range(n)`` drawn with replacement, ``(R,)``.

    Their standard deviation is the bootstrap estimate of the statistic's spread over draws of
    ``n`` samples (Efron 1979); the same ``seed`` gives the same resamples, so two statistics of one
    sample set are resampled together.
    """
    if n < 1 or num_resamples < 2:
        raise ValueError(f"need n >= 1 samples and num_resamples >= 2, got n={n}, num_resamples={num_resamples}.")
    rng = np.random.default_rng(seed)
    return np.array([statistic(rng.integers(0, n, n)) for _ in range(num_resamples)], np.float64)


def digit_histogram(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts ``(num_classes,)`` of integer labels ``(N,)``, e.g. ``probs.argmax(-1)``."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}.")
    return np.bincount(labels.ravel(), minlength=num_classes)


def kl_to_uniform(counts: np.ndarray) -> float:
    """KL(p || uniform) in nats of the distribution ``p = counts / sum(counts)``.

    0 for perfectly balanced digits, ``log(K)`` when every sample is the same
    digit (2.303 for 10 classes). Empty classes contribute 0 (0 log 0 = 0).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.sum() <= 0 or np.any(counts < 0):
        raise ValueError(f"need non-negative counts with a positive total, got {counts}.")
    p = counts / counts.sum()
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log(p[nonzero] * len(p))))


def unreadable_mask(probs: np.ndarray, threshold: float = UNREADABLE_THRESHOLD) -> np.ndarray:
    """Boolean ``(N,)``: the top-class probability of ``(N, K)`` ``probs`` is below ``threshold``."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"need class probabilities of shape (N, K), got {probs.shape}.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}.")
    return probs.max(axis=-1) < threshold


def _pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_radii(features: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row."""
    radii = np.empty(len(features))
    for start in range(0, len(features), chunk):
        d = _pairwise_sq_distances(features[start : start + chunk], features)
        # the (k+1)-th smallest: the row itself is at distance 0
        radii[start : start + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> float:
    """Share of ``points`` inside at least one ball (centre, radius) of the other set."""
    inside = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), chunk):
        d = _pairwise_sq_distances(points[start : start + chunk], centres)
        inside[start : start + chunk] = np.any(d <= radii[None, :], axis=1)
    return float(inside.mean())


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, chunk: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour balls.

    Precision: the share of generated samples inside the real manifold (the
    union of balls around each real feature reaching its k-th nearest real
    neighbour): quality. Recall: the share of real samples inside the generated
    manifold: coverage. Both in [0, 1]; k = 3 as in the paper.
    """
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need (N, D) feature sets of the same D, got {real.shape} and {fake.shape}.")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set, got {len(real)} and {len(fake)}.")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall
