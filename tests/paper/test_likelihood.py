"""The variational bound's terms and bits per dimension."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.configs import get_config, schedule_from_config
from ddpm_jax.diffusion.process import p_variance
from ddpm_jax.diffusion.likelihood import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_kl,
    vlb_terms,
)
from ddpm_jax.configs import build_model
from ddpm_jax.diffusion.schedules import DiffusionSchedule, cosine_beta_schedule


def test_kl_of_identical_gaussians_is_zero_and_of_others_positive_and_exact():
    mean, logvar = jnp.array([0.3, -2.0]), jnp.array([-1.0, 2.0])
    np.testing.assert_allclose(normal_kl(mean, logvar, mean, logvar), 0.0, atol=1e-7)
    # KL(N(0, 1) || N(1, e^2)) = log(e) + (1 + 1) / (2 e^2) - 1/2.
    expected = 1.0 + 2.0 / (2 * math.e**2) - 0.5
    np.testing.assert_allclose(normal_kl(0.0, 0.0, 1.0, 2.0), expected, rtol=1e-6)
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=1000), jnp.float32) for _ in range(4)]
    assert bool(jnp.all(normal_kl(*args) >= 0))


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.93, -5.0), (-1.2, 0.5), (0.5, -8.0)])
def test_the_discretized_decoder_puts_probability_one_on_the_256_pixel_values(mean, log_scale):
    levels = jnp.linspace(-1.0, 1.0, 256)
    log_p = discretized_gaussian_log_likelihood(levels, jnp.full(256, mean), jnp.full(256, log_scale))
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(log_p))), 1.0, rtol=1e-4)
    assert bool(jnp.all(log_p <= 0))


def _tiny():
    config = get_config("tiny")
    model = build_model(config.model)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
    images = jax.random.randint(jax.random.PRNGKey(1), (3, 28, 28, 1), 0, 256).astype(jnp.float32) / 127.5 - 1
    return config, (lambda v, x, t: model.apply(v, x, t, train=False)), variables, images


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_every_vlb_term_is_non_negative_and_bits_per_dim_finite(variance):
    config, eps_fn, variables, x0 = _tiny()
    schedule = schedule_from_config(config)
    terms, prior = jax.jit(lambda x: vlb_terms(eps_fn, schedule, variables, x, jax.random.PRNGKey(2),
                                               variance=variance))(x0)
    assert terms.shape == (3, config.diffusion.num_timesteps) and prior.shape == (3,)
    assert bool(jnp.all(terms >= 0)) and bool(jnp.all(prior >= 0))
    bpd = bits_per_dim(terms, prior, 28 * 28)
    assert bool(jnp.all(jnp.isfinite(bpd))) and bool(jnp.all(bpd > 0))


def test_an_exact_denoiser_of_a_single_image_makes_every_kl_term_vanish():
    # Data = one image x*: the true noise is (x_t - sqrt(abar) x*) / sqrt(1 - abar), and with
    # sigma^2 = beta-tilde the model's reverse step is the true posterior: each L_t (t > 0) is 0.
    config, _, _, x0 = _tiny()
    schedule = schedule_from_config(config)
    target = x0 * 0.9  # inside [-1, 1], so clipping the predicted x_0 changes nothing

    def exact_eps(variables, x_t, t):
        a = schedule.alpha_bars[t][:, None, None, None]
        return (x_t - jnp.sqrt(a) * target) / jnp.sqrt(1 - a)

    terms, _ = vlb_terms(exact_eps, schedule, None, target, jax.random.PRNGKey(3), variance="beta_tilde")
    np.testing.assert_allclose(terms[:, 1:], 0.0, atol=2e-3)


def test_the_prior_term_is_small_for_the_cosine_schedule_at_t_100():
    config = get_config("cpu")
    x0 = -jnp.ones((2, 28, 28, 1))  # background: the largest |x0|
    per_dim = prior_kl(schedule_from_config(config), x0) / (28 * 28 * math.log(2))
    assert bool(jnp.all(per_dim < 1e-3))  # bits per dimension


def test_the_likelihood_cli_writes_bits_per_dim_with_its_parts(tmp_path, idx_dir, capsys):
    import json

    from experiments import likelihood, mnist

    workdir = tmp_path / "run"
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--steps", "2",
                       "--no-progress"]) == 0
    assert likelihood.main(["--workdir", str(workdir), "--idx-dir", str(idx_dir), "--batch-size", "5",
                            "--no-progress"]) == 0
    result = json.loads((workdir / "likelihood.json").read_text())
    assert result["num_images"] == 12 and result["num_dims"] == 784 and result["weights"] == "ema"
    parts = result["prior_bits_per_dim"] + result["decoder_bits_per_dim"] + result["kl_terms_bits_per_dim"]
    assert result["bits_per_dim"] == pytest.approx(parts, rel=1e-5) and result["stderr"] > 0
    assert "bits/dim" in capsys.readouterr().out
    assert likelihood.main(["--workdir", str(workdir), "--idx-dir", str(idx_dir), "--batch-size", "0"]) == 2


def test_fixed_large_is_beta_but_for_the_decoder_variance_and_changes_only_l0():
    # Ho et al.'s code and improved-diffusion's FIXED_LARGE: beta_t, with beta-tilde of index 1 at index 0.
    schedule = DiffusionSchedule.from_betas(cosine_beta_schedule(100))
    large, beta = p_variance(schedule, "fixed_large"), p_variance(schedule, "beta")
    np.testing.assert_array_equal(large[1:], beta[1:])
    assert float(large[0]) == float(schedule.posterior_variance[1]) != float(beta[0])
    np.testing.assert_allclose(p_variance(schedule, "fixed_large", log=True), np.log(large), rtol=1e-6)
