import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion.samplers import make_ancestral_sampler
from ddpm_jax.diffusion.schedules import DiffusionSchedule, cosine_beta_schedule, linear_beta_schedule

SHAPE = (3, 8, 8, 1)


def _oracle(schedule, target):
    """The exact eps for data that is a single image: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""

    def eps_fn(variables, x, t):
        s = schedule.sqrt_alpha_bars[t][:, None, None, None]
        r = schedule.sqrt_one_minus_alpha_bars[t][:, None, None, None]
        return (x - s * target) / r

    return eps_fn


def _toy_eps(variables, x, t):
    return variables["w"] * x + 1e-3 * t[:, None, None, None].astype(jnp.float32)


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_betas(cosine_beta_schedule(20))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("mean", ["x0_clip", "eps"])
def test_sampling_with_the_exact_noise_recovers_a_single_data_point(schedule, variance, mean):
    # For data that is one image the optimal eps predicts it exactly, and the last step adds no noise,
    # so Algorithm 2 must land on that image whatever x_T and the noise were.
    target = jnp.linspace(-0.9, 0.9, 64).reshape(1, 8, 8, 1)
    sampler = jax.jit(make_ancestral_sampler(_oracle(schedule, target), schedule, SHAPE, variance=variance, mean=mean))
    out = sampler({}, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out, jnp.broadcast_to(target, SHAPE), atol=1e-4)


def test_same_key_same_samples_other_key_other_samples(schedule):
    sampler = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE))
    a = sampler({"w": 0.1}, jax.random.PRNGKey(1))
    b = sampler({"w": 0.1}, jax.random.PRNGKey(1))
    c = sampler({"w": 0.1}, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


@pytest.mark.parametrize("mean", ["x0_clip", "eps"])
def test_samples_are_finite_and_each_image_draws_its_own_noise(schedule, mean):
    # (Their range needs no test: the sampler clips x_0 to [-1, 1].) A chain that shared its noise across the
    # batch, or one that blew up to NaN, would fail here.
    out = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, mean=mean))({"w": 0.5}, jax.random.PRNGKey(3))
    assert out.shape == SHAPE
    assert bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.min(jnp.max(jnp.abs(out[1:] - out[0]), axis=(1, 2, 3)))) > 1e-3


def test_intermediates_run_from_noise_to_the_returned_sample(schedule):
    sampler = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, return_every=5))
    x0, frames = sampler({"w": 0.2}, jax.random.PRNGKey(5))
    assert frames.shape == (5,) + SHAPE  # after 0, 5, 10, 15 and all 20 steps
    np.testing.assert_array_equal(frames[-1], x0)
    # The first frame is x_T ~ N(0, I) before any step: the plain sampler's x_T is the same draw.
    plain = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE))({"w": 0.2}, jax.random.PRNGKey(5))
    np.testing.assert_array_equal(plain, x0)
    assert float(jnp.std(frames[0])) > 0.5


def test_beta_and_beta_tilde_variances_give_different_chains():
    schedule = DiffusionSchedule.from_betas(linear_beta_schedule(20, 1e-3, 0.2))
    a = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, variance="beta"))({"w": 0.1}, jax.random.PRNGKey(6))
    b = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, variance="beta_tilde"))({"w": 0.1}, jax.random.PRNGKey(6))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_unknown_options_are_refused_with_allowed_values(schedule):
    with pytest.raises(ValueError, match="beta, beta_tilde, learned"):
        make_ancestral_sampler(_toy_eps, schedule, SHAPE, variance="large")
    with pytest.raises(ValueError, match="x0_clip, eps"):
        make_ancestral_sampler(_toy_eps, schedule, SHAPE, mean="v")
