import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion.process import p_mean, p_mean_variance, p_variance, predict_x0_from_eps, q_posterior_mean, q_sample
from ddpm_jax.diffusion.schedules import DiffusionSchedule, cosine_beta_schedule, linear_beta_schedule


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_betas(cosine_beta_schedule(20))


def test_q_sample_closed_form_matches_iterating_the_forward_chain_in_distribution(schedule):
    # x_t = sqrt(1-beta_t) x_{t-1} + sqrt(beta_t) eps, iterated, against the closed form.
    draws, T = 200_000, schedule.num_timesteps
    x0 = jnp.full((draws, 1, 1, 1), 0.7)
    key = jax.random.PRNGKey(0)

    def step(x, inputs):
        beta, k = inputs
        return jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(k, x.shape), None

    for i in (0, 5, T - 1):
        iterated, _ = jax.lax.scan(step, x0, (schedule.betas[: i + 1], jax.random.split(key, i + 1)))
        closed = q_sample(schedule, x0, jnp.full((draws,), i), jax.random.normal(jax.random.PRNGKey(1), x0.shape))
        for x in (iterated, closed):
            assert float(jnp.mean(x)) == pytest.approx(0.7 * float(schedule.sqrt_alpha_bars[i]), abs=0.01)
            assert float(jnp.var(x)) == pytest.approx(1 - float(schedule.alpha_bars[i]), abs=0.01)
        assert abs(float(jnp.mean(iterated) - jnp.mean(closed))) < 0.01
        assert abs(float(jnp.var(iterated) - jnp.var(closed))) < 0.01


def test_q_sample_applies_each_example_its_own_timestep(schedule):
    x0 = jnp.ones((3, 4, 4, 1))
    noise = jnp.zeros_like(x0)
    t = jnp.array([0, 10, 19])
    out = q_sample(schedule, x0, t, noise)
    np.testing.assert_allclose(out[:, 0, 0, 0], schedule.sqrt_alpha_bars[t], rtol=1e-6)


def test_q_sample_rejects_mismatched_shapes(schedule):
    with pytest.raises(AssertionError):
        q_sample(schedule, jnp.zeros((2, 4, 4, 1)), jnp.zeros((3,), jnp.int32), jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(AssertionError):
        q_sample(schedule, jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 4, 4, 2)))


def test_predict_x0_inverts_q_sample(schedule):
    key1, key2 = jax.random.split(jax.random.PRNGKey(2))
    x0 = jax.random.uniform(key1, (4, 6, 6, 1), minval=-1, maxval=1)
    noise = jax.random.normal(key2, x0.shape)
    t = jnp.array([0, 3, 9, 15])
    x_t = q_sample(schedule, x0, t, noise)
    np.testing.assert_allclose(predict_x0_from_eps(schedule, x_t, t, noise), x0, atol=2e-4)


def test_posterior_mean_matches_bayes_rule_for_gaussians():
    # q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): the product of two Gaussians in x_{t-1}.
    s = DiffusionSchedule.from_betas(linear_beta_schedule(30, 1e-3, 0.1))
    i = 12
    a, b = float(s.alphas[i]), float(s.betas[i])
    abar_prev = float(s.alpha_bars_prev[i])
    x0, xt = 0.3, -0.4
    precision = a / b + 1 / (1 - abar_prev)
    mean = (np.sqrt(a) * xt / b + np.sqrt(abar_prev) * x0 / (1 - abar_prev)) / precision
    got = q_posterior_mean(s, jnp.full((1, 1, 1, 1), x0), jnp.full((1, 1, 1, 1), xt), jnp.array([i]))
    assert float(got.ravel()[0]) == pytest.approx(mean, rel=1e-4)
    assert float(s.posterior_variance[i]) == pytest.approx(1 / precision, rel=1e-4)


def test_eps_mean_equals_x0_mean_when_clipping_does_nothing(schedule):
    # Ho et al.'s eq. 11 (the report's eq. 14) is the posterior mean at the x_0 that eps implies.
    key1, key2 = jax.random.split(jax.random.PRNGKey(3))
    x0 = jax.random.uniform(key1, (5, 4, 4, 1), minval=-0.9, maxval=0.9)
    noise = jax.random.normal(key2, x0.shape)
    t = jnp.array([0, 1, 7, 13, 19])
    x_t = q_sample(schedule, x0, t, noise)
    np.testing.assert_allclose(
        p_mean(schedule, x_t, t, noise, "eps"), p_mean(schedule, x_t, t, noise, "x0_clip"), atol=5e-4
    )


def test_x0_clip_mean_keeps_the_implied_x0_inside_the_data_range(schedule):
    x_t = jnp.full((1, 2, 2, 1), 3.0)
    t = jnp.array([19])
    eps = jnp.full_like(x_t, -5.0)  # implies x_0 far above 1
    clipped = p_mean(schedule, x_t, t, eps, "x0_clip")
    expected = q_posterior_mean(schedule, jnp.ones_like(x_t), x_t, t)
    np.testing.assert_allclose(clipped, expected, rtol=1e-6)


def test_unknown_mean_type_is_refused_with_the_allowed_values(schedule):
    with pytest.raises(ValueError, match="x0_clip, eps"):
        p_mean(schedule, jnp.zeros((1, 1, 1, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, 1, 1)), "median")


@pytest.mark.parametrize("variance_type", ["beta", "beta_tilde"])
@pytest.mark.parametrize("mean_type", ["x0_clip", "eps"])
def test_p_mean_variance_is_the_fixed_variance_gaussian_of_p_mean(schedule, variance_type, mean_type):
    key_x, key_eps = jax.random.split(jax.random.PRNGKey(3))
    x_t = jax.random.normal(key_x, (4, 6, 6, 1))
    eps = jax.random.normal(key_eps, (4, 6, 6, 1))
    t = jnp.array([0, 1, 10, schedule.num_timesteps - 1])
    reverse = p_mean_variance(schedule, x_t, t, eps, variance_type, mean_type)
    np.testing.assert_array_equal(reverse.mean, p_mean(schedule, x_t, t, eps, mean_type))
    table = p_variance(schedule, variance_type)
    chex.assert_shape([reverse.log_variance, reverse.std], (4, 1, 1, 1))
    np.testing.assert_allclose(np.exp(reverse.log_variance[1:, 0, 0, 0]), table[t[1:]], rtol=1e-5)
    np.testing.assert_allclose(np.square(reverse.std[:, 0, 0, 0]), table[t], rtol=1e-5)
    x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    np.testing.assert_allclose(reverse.pred_x0, np.clip(x0, -1, 1) if mean_type == "x0_clip" else x0, rtol=1e-6)


def test_p_mean_variance_learned_spans_beta_tilde_to_beta_and_keeps_the_mean_of_eps(schedule):
    x_t = jax.random.normal(jax.random.PRNGKey(4), (3, 4, 4, 1))
    eps = jax.random.normal(jax.random.PRNGKey(5), (3, 4, 4, 1))
    t = jnp.array([1, 8, 15])
    for v, variance_type in ((1.0, "beta"), (-1.0, "beta_tilde")):
        learned = p_mean_variance(schedule, x_t, t, jnp.concatenate([eps, jnp.full_like(eps, v)], -1), "learned")
        fixed = p_mean_variance(schedule, x_t, t, eps, variance_type)
        np.testing.assert_array_equal(learned.mean, fixed.mean)
        np.testing.assert_allclose(learned.log_variance, jnp.broadcast_to(fixed.log_variance, eps.shape), rtol=1e-6)
        np.testing.assert_allclose(learned.std, jnp.broadcast_to(fixed.std, eps.shape), rtol=1e-5)
