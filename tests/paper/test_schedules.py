import math

import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion.schedules import DiffusionSchedule, cosine_beta_schedule, extract, linear_beta_schedule


@pytest.mark.parametrize("make", [lambda T: linear_beta_schedule(T), lambda T: cosine_beta_schedule(T)])
@pytest.mark.parametrize("T", [1, 10, 100, 1000])
def test_betas_are_float32_of_shape_T_inside_open_unit_interval(make, T):
    betas = make(T)
    assert betas.shape == (T,) and betas.dtype == jnp.float32
    assert np.all(np.asarray(betas) > 0) and np.all(np.asarray(betas) < 1)


@pytest.mark.parametrize("betas", [linear_beta_schedule(1000), cosine_beta_schedule(100), cosine_beta_schedule(1000)])
def test_alpha_bars_strictly_decrease_from_below_one(betas):
    abar = np.asarray(DiffusionSchedule.from_betas(betas).alpha_bars, dtype=np.float64)
    assert abar[0] < 1
    assert np.all(np.diff(abar) < 0)


def test_linear_schedule_endpoints_are_ho_et_al_values():
    betas = np.asarray(linear_beta_schedule(1000))
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-4)


def test_cosine_schedule_matches_the_formula_evaluated_independently():
    T, s = 100, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = [min(1 - (f(i + 1) / f(0)) / (f(i) / f(0)), 0.999) for i in range(T)]
    np.testing.assert_allclose(np.asarray(cosine_beta_schedule(T)), expected, rtol=1e-6)
    # Golden values at a few steps, and abar_t = f(t)/f(0) itself.
    abar = np.asarray(DiffusionSchedule.from_betas(cosine_beta_schedule(T)).alpha_bars)
    for i in (0, 49, 98):
        assert abar[i] == pytest.approx(f(i + 1) / f(0), rel=1e-5)


def test_cosine_last_beta_is_clipped_at_max_beta_and_alpha_bar_T_is_near_zero():
    betas = np.asarray(cosine_beta_schedule(100))
    assert betas[-1] == pytest.approx(0.999)
    schedule = DiffusionSchedule.from_betas(betas)
    assert float(schedule.alpha_bars[-1]) < 1e-4
    linear = DiffusionSchedule.from_betas(linear_beta_schedule(1000))
    assert float(linear.alpha_bars[-1]) < 1e-4


def test_derived_tables_agree_with_their_definitions_in_float64():
    betas = np.asarray(cosine_beta_schedule(50), dtype=np.float64)
    s = DiffusionSchedule.from_betas(betas)
    s.check()
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(s.alpha_bars, abar, rtol=1e-5)
    np.testing.assert_allclose(s.alpha_bars_prev, abar_prev, rtol=1e-5)
    np.testing.assert_allclose(s.posterior_variance, betas * (1 - abar_prev) / (1 - abar), rtol=1e-5, atol=1e-12)
    assert float(s.posterior_variance[0]) == 0.0  # x_0 is determined by x_1 and x_0
    assert np.all(np.isfinite(np.asarray(s.posterior_log_variance_clipped)))
    # beta-tilde <= beta: the posterior variance is the lower bound (Ho et al. sec. 3.2).
    assert np.all(np.asarray(s.posterior_variance) <= np.asarray(s.betas) + 1e-7)


@pytest.mark.parametrize("bad", [[0.1, 0.0], [0.5, 1.0], [0.1, -0.2], [[0.1]], [0.1, float("nan")]])
def test_from_betas_rejects_values_outside_the_open_unit_interval(bad):
    with pytest.raises(ValueError, match="beta"):
        DiffusionSchedule.from_betas(bad)


@pytest.mark.parametrize("T", [0, -3])
def test_schedules_reject_nonpositive_T(T):
    with pytest.raises(ValueError, match="num_timesteps"):
        cosine_beta_schedule(T)
    with pytest.raises(ValueError, match="num_timesteps"):
        linear_beta_schedule(T)


def test_extract_broadcasts_per_example_values_over_image_axes():
    table = jnp.arange(10.0)
    out = extract(table, jnp.array([3, 7]), 4)
    assert out.shape == (2, 1, 1, 1)
    np.testing.assert_array_equal(out.ravel(), [3.0, 7.0])
