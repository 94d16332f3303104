"""The metrics are pure functions of arrays: checked against closed forms and invariances."""

import numpy as np
import pytest

from ddpm_jax.evaluation import metrics


def _correlated_features(n=2000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def test_fid_of_a_set_against_itself_is_zero():
    f = _correlated_features()
    assert metrics.fid(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_a_shifted_copy_is_the_squared_shift():
    # Same covariance, means apart by c: the trace terms cancel exactly.
    f = _correlated_features()
    shift = np.linspace(-1, 1, f.shape[1])
    assert metrics.fid(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fid_grows_with_the_shift_and_with_added_noise():
    f = _correlated_features()
    noise = np.random.default_rng(1).normal(size=f.shape)
    shifted = [metrics.fid(f, f + s) for s in (0.0, 0.1, 0.5, 2.0)]
    noised = [metrics.fid(f, f + s * noise) for s in (0.0, 0.1, 0.5, 2.0)]
    assert np.all(np.diff(shifted) > 0), shifted
    assert np.all(np.diff(noised) > 0), noised


def test_fid_is_symmetric():
    a, b = _correlated_features(seed=0), 2.0 * _correlated_features(seed=1) + 0.3
    assert metrics.fid(a, b) == pytest.approx(metrics.fid(b, a), rel=1e-9)
    assert metrics.fid(a, b) > 1.0


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    # For diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_singular_covariances_is_real_and_finite():
    # Post-ReLU features often have dimensions that are always 0: rank-deficient covariances.
    f = np.maximum(_correlated_features(n=500, d=32), 0)
    f[:, :5] = 0.0
    g = np.maximum(_correlated_features(n=500, d=32, seed=3), 0)
    g[:, :5] = 0.0
    value = metrics.fid(f, g)
    assert isinstance(value, float) and np.isfinite(value) and value > 0


def test_frechet_distance_refuses_statistics_of_different_sizes():
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_gaussian_statistics_need_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.gaussian_statistics(np.zeros((1, 4)))


def test_digit_histogram_counts_each_label():
    labels = np.array([1, 1, 1, 7, 0, 9, 9])
    np.testing.assert_array_equal(metrics.digit_histogram(labels), [1, 3, 0, 0, 0, 0, 0, 1, 0, 2])
    with pytest.raises(ValueError, match="0..9"):
        metrics.digit_histogram(np.array([3, 10]))


def test_kl_to_uniform_is_zero_for_balanced_digits_and_log_k_for_one_digit():
    assert metrics.kl_to_uniform(np.full(10, 7)) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kl_to_uniform(np.eye(10)[3] * 100) == pytest.approx(np.log(10))
    # The report's Figure 6 (readable samples only): 40 of its 98 readable samples were "1".
    report = np.array([2, 40, 4, 10, 15, 5, 5, 11, 2, 3])
    p = report / report.sum()
    assert metrics.kl_to_uniform(report) == pytest.approx(np.sum(p * np.log(10 * p)))
    assert 0.4 < metrics.kl_to_uniform(report) < 0.5


def test_unreadable_mask_uses_the_top_class_probability():
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9]])
    np.testing.assert_array_equal(metrics.unreadable_mask(probs, 0.9), [False, True, False])
    with pytest.raises(ValueError, match="threshold"):
        metrics.unreadable_mask(probs, 0.0)


def test_precision_and_recall_of_a_set_against_itself_are_one():
    f = _correlated_features(n=300)
    assert metrics.precision_recall(f, f, chunk=64) == (1.0, 1.0)


def test_precision_and_recall_separate_quality_from_coverage():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(600, 4))
    far = real + 100.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    # Samples from only half the real distribution: all plausible (precision high), half of it missed (recall low).
    half = real[real[:, 0] > 0.5]
    precision, recall = metrics.precision_recall(real, half, chunk=128)
    assert precision > 0.95 and recall < 0.6


def _mmd2_by_loops(x, y):
    """The unbiased squared MMD with KID's kernel, pair by pair as Gretton et al.'s eq. 3 writes it."""
    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / len(a) + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_unbiased_mmd_matches_the_pairwise_sums_of_its_definition():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(5, 4)) + 0.3
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(_mmd2_by_loops(x.tolist(), y.tolist()), rel=1e-12)


def test_kid_of_two_draws_of_one_distribution_is_zero_within_its_spread():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    mean, std = metrics.kid(a, b, num_subsets=50, subset_size=500)
    # Unbiased: centred on 0 (a biased estimate would sit near 2 / subset_size above it).
    assert abs(mean) < 3 * std / np.sqrt(50) + 1e-4, (mean, std)
    shifted, _ = metrics.kid(a, b + 0.5, num_subsets=50, subset_size=500)
    assert shifted > 20 * std


def test_kid_uses_subsets_no_larger_than_either_set_and_is_deterministic():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(300, 8)) + 1.0
    assert metrics.kid(a, b, subset_size=1000) == metrics.kid(a, b, subset_size=1000)
    assert metrics.kid(a, b, subset_size=1000) == metrics.kid(a, b, subset_size=30)
    with pytest.raises(ValueError, match="at least 2 rows"):
        metrics.kid(a[:1], b)


def test_bootstrap_spread_of_a_rate_matches_the_binomial_standard_error():
    rng = np.random.default_rng(2)
    flags = rng.random(4000) < 0.05
    spread = metrics.bootstrap(lambda i: flags[i].mean(), len(flags), num_resamples=400).std(ddof=1)
    p = flags.mean()
    assert spread == pytest.approx(np.sqrt(p * (1 - p) / len(flags)), rel=0.15)


def test_bootstrap_spread_of_fid_shrinks_as_one_over_root_n():
    rng = np.random.default_rng(4)
    reference = metrics.gaussian_statistics(rng.normal(size=(5000, 8)))
    spreads = []
    for n in (500, 2000):
        f = rng.normal(size=(n, 8)) + 0.3
        fids = metrics.bootstrap(lambda i: metrics.frechet_distance(*metrics.gaussian_statistics(f[i]), *reference),
                                 n, num_resamples=200, seed=0)
        spreads.append(fids.std(ddof=1))
    assert spreads[0] / spreads[1] == pytest.approx(2.0, rel=0.3)
