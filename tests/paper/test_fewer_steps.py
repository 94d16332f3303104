"""Timestep respacing and DDIM: the same network, K of its T steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.configs import build_model, get_config, sampling_timesteps, schedule_from_config
from ddpm_jax.diffusion.samplers import ddim_invert, make_ancestral_sampler, make_ddim_decoder, make_ddim_sampler
from ddpm_jax.diffusion.schedules import betas_for, respace_betas, space_timesteps


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respacing_to_all_t_steps_gives_back_the_original_betas(name):
    betas = betas_for(name, 1000)
    np.testing.assert_allclose(respace_betas(betas, np.arange(1000)), betas, rtol=1e-12, atol=0)
    config = get_config("cpu")
    config.diffusion.schedule = name
    full, respaced = schedule_from_config(config), schedule_from_config(config, steps=100)
    for field in full.__dataclass_fields__:  # every float32 table, bit for bit
        np.testing.assert_array_equal(getattr(respaced, field), getattr(full, field), err_msg=field)


@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_a_respaced_schedule_keeps_the_marginals_of_the_steps_it_keeps(steps):
    config = get_config("cpu")
    kept = sampling_timesteps(config, steps)
    full, respaced = schedule_from_config(config), schedule_from_config(config, steps)
    assert respaced.num_timesteps == steps
    np.testing.assert_allclose(respaced.alpha_bars, full.alpha_bars[kept], rtol=1e-6)
    assert np.all((np.asarray(respaced.betas) > 0) & (np.asarray(respaced.betas) < 1))


def test_spaced_timesteps_run_from_first_to_last_in_even_strides():
    np.testing.assert_array_equal(space_timesteps(100, 5), [0, 25, 50, 74, 99])
    np.testing.assert_array_equal(space_timesteps(100, 100), np.arange(100))
    np.testing.assert_array_equal(space_timesteps(100, 1), [99])
    for bad in (0, 101, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer in 1..T=100"):
            space_timesteps(100, bad)


def _tiny_network():
    config = get_config("tiny")
    config.diffusion.num_timesteps = 20
    model = build_model(config.model)
    variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
    return config, lambda v, x, t: model.apply(v, x, t, train=False), variables


@pytest.mark.parametrize("steps", [None, 7])
def test_ddim_with_eta_one_is_ancestral_sampling_with_the_posterior_variance(steps):
    config, eps_fn, variables = _tiny_network()
    schedule = schedule_from_config(config, steps)
    timesteps = sampling_timesteps(config, steps)
    shape = (3, 28, 28, 1)
    ancestral = make_ancestral_sampler(eps_fn, schedule, shape, variance="beta_tilde", mean="x0_clip",
                                       timesteps=timesteps)
    ddim = make_ddim_sampler(eps_fn, schedule, shape, eta=1.0, timesteps=timesteps)
    key = jax.random.PRNGKey(5)
    # The same math in another order: float32 rounding through 20 steps stays under 1e-4.
    np.testing.assert_allclose(jax.jit(ddim)(variables, key), jax.jit(ancestral)(variables, key), atol=1e-4)


def test_ddim_with_eta_zero_is_a_function_of_x_T_alone():
    config, eps_fn, variables = _tiny_network()
    schedule, timesteps = schedule_from_config(config, 5), sampling_timesteps(config, 5)
    sampler = jax.jit(make_ddim_sampler(eps_fn, schedule, (2, 28, 28, 1), eta=0.0, clip_denoised=False,
                                        timesteps=timesteps))
    key = jax.random.PRNGKey(0)
    x_T = jax.random.normal(jax.random.split(key)[0], (2, 28, 28, 1))
    decoded = make_ddim_decoder(eps_fn, schedule, timesteps=timesteps)(variables, x_T)
    np.testing.assert_allclose(sampler(variables, key), jnp.clip(decoded, -1, 1), atol=1e-5)
    np.testing.assert_array_equal(sampler(variables, key), sampler(variables, key))


def _gaussian_data_model(config, mean=0.2, std=0.5):
    """The exact noise predictor for data ~ N(mean, std^2) per pixel: E[eps | x_t]."""
    alpha_bars = schedule_from_config(config).alpha_bars

    def eps_fn(variables, x, t):
        a = alpha_bars[t][:, None, None, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mean) / (a * std**2 + 1 - a)

    x0 = mean + std * jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    return eps_fn, x0


# Tolerances (max abs error, data of std 0.5, cosine T = 100), measured: 0.038, 7e-5, 2e-3.
@pytest.mark.parametrize("steps, refine, tolerance", [(100, 0, 0.05), (100, 4, 5e-4), (20, 4, 1e-2)])
def test_ddim_decodes_its_own_inversion_back_to_the_data(steps, refine, tolerance):
    config = get_config("cpu")
    eps_fn, x0 = _gaussian_data_model(config)
    schedule, timesteps = schedule_from_config(config, steps), sampling_timesteps(config, steps)
    x_T = jax.jit(lambda x: ddim_invert(eps_fn, schedule, None, x, timesteps=timesteps, refine=refine))(x0)
    assert 0.7 < float(jnp.std(x_T)) < 1.1  # noise-like, not the data
    back = make_ddim_decoder(eps_fn, schedule, timesteps=timesteps)(None, x_T)
    assert float(jnp.max(jnp.abs(back - x0))) < tolerance
