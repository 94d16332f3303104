"""Learned reverse variance (Nichol & Dhariwal 2021): the interpolation, L_hybrid's gradients, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import build_model, get_config, schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.diffusion.process import learned_log_variance, split_learned_variance
from ddpm_jax.diffusion.likelihood import vlb_terms
from ddpm_jax.diffusion.losses import l_hybrid, l_simple


def test_the_learned_variance_stays_between_beta_tilde_and_beta():
    schedule = schedule_from_config(get_config("cpu"))
    t = jnp.arange(100)
    v = jax.random.uniform(jax.random.PRNGKey(0), (100, 4, 4, 1), minval=-3.0, maxval=3.0)
    log_var = learned_log_variance(schedule, t, v)
    low = schedule.posterior_log_variance_clipped[:, None, None, None]
    high = jnp.log(schedule.betas)[:, None, None, None]
    assert bool(jnp.all(log_var >= low - 1e-6)) and bool(jnp.all(log_var <= high + 1e-6))
    np.testing.assert_allclose(learned_log_variance(schedule, t, jnp.ones((100, 1, 1, 1)))[:, 0, 0, 0],
                               jnp.log(schedule.betas), rtol=1e-6)
    np.testing.assert_allclose(learned_log_variance(schedule, t, -jnp.ones((100, 1, 1, 1)))[:, 0, 0, 0],
                               schedule.posterior_log_variance_clipped, rtol=1e-6)


def _fixed_output_model(output):
    return lambda x_t, t: (output, None)


def test_l_hybrid_trains_the_mean_by_l_simple_alone_and_the_variance_by_l_vlb():
    schedule = schedule_from_config(get_config("tiny"))
    key = jax.random.PRNGKey(1)
    x0 = jax.random.uniform(jax.random.PRNGKey(2), (4, 8, 8, 1), minval=-1, maxval=1)
    output = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 2))

    def hybrid(out):
        return l_hybrid(schedule, _fixed_output_model(out), x0, key, vlb_weight=0.001)[0]

    def simple(out):
        return l_simple(schedule, lambda x_t, t: (split_learned_variance(out)[0], None), x0, key)[0]

    g_hybrid, g_simple = jax.grad(hybrid)(output), jax.grad(simple)(output)
    # The stop-gradient: the eps half gets exactly L_simple's gradient...
    np.testing.assert_allclose(g_hybrid[..., :1], g_simple[..., :1], rtol=1e-6, atol=1e-9)
    # ... and the v half gets L_vlb's, which L_simple does not have.
    assert float(jnp.abs(g_hybrid[..., 1:]).max()) > 0 and float(jnp.abs(g_simple[..., 1:]).max()) == 0
    assert hybrid(output) >= simple(output)  # lambda * L_vlb >= 0


def test_a_learned_variance_network_outputs_twice_the_channels_and_samples():
    config = get_config("tiny")
    config.model.learn_variance = True
    model = build_model(config.model)
    out = model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,), jnp.int32)),
                      jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,), jnp.int32))
    assert out.shape == (2, 28, 28, 2)
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    key = jax.random.PRNGKey(0)
    for kwargs in ({}, {"variance": "beta"}, {"steps": 4}, {"steps": 4, "method": "ddim"}):
        images = ddpm_jax.sample(checkpoint, key, 2, **kwargs)
        assert images.shape == (2, 28, 28, 1) and bool(jnp.all(jnp.isfinite(images))), kwargs
    # The default is the network's own Sigma, not the config's fixed beta.
    assert not np.array_equal(ddpm_jax.sample(checkpoint, key, 2), ddpm_jax.sample(checkpoint, key, 2,
                                                                                   variance="beta"))
    terms, prior = vlb_terms(lambda v, x, t: model.apply(v, x, t), schedule_from_config(config),
                             checkpoint.variables, jnp.zeros((2, 28, 28, 1)) - 0.5, key, variance="learned")
    assert bool(jnp.all(terms >= 0)) and terms.shape == (2, 10)


def test_a_learned_variance_is_refused_for_a_network_that_does_not_learn_it(tmp_path):
    config = get_config("tiny")
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    with pytest.raises(ValueError, match="needs a network trained to output it"):
        ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), 2, variance="learned")
    from experiments import mnist

    assert mnist.main(["--preset", "tiny", "--workdir", str(tmp_path), "--set", "sampling.variance=learned"]) == 2
