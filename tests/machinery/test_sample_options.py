"""What ``sample()`` accepts: its options checked once, with what is allowed, and the three-argument call kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import create_train_state, get_config
from ddpm_jax.options import sampling_options


@pytest.fixture(scope="module")
def checkpoint():
    config = get_config("tiny")
    return DiffusionCheckpoint.from_train_state(create_train_state(config), config)


def test_sample_takes_steps_and_method_and_keeps_the_three_argument_call(checkpoint):
    key = jax.random.PRNGKey(1)
    default = ddpm_jax.sample(checkpoint, key, 3)
    np.testing.assert_array_equal(ddpm_jax.sample(checkpoint, key, 3, steps=10), default)  # T = 10: the same
    for kwargs in ({"steps": 4}, {"steps": 4, "method": "ddim"}, {"method": "ddim", "eta": 1.0}):
        images = ddpm_jax.sample(checkpoint, key, 3, **kwargs)
        assert images.shape == (3, 28, 28, 1) and bool(jnp.all(jnp.abs(images) <= 1)), kwargs
    images, frames = ddpm_jax.sample(checkpoint, key, 2, steps=4, method="ddim", return_every=2)
    assert frames.shape == (3, 2, 28, 28, 1)  # x_T, after 2 steps, x_0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, r"steps must be an integer in 1..10"),
        ({"steps": 11}, r"steps must be an integer in 1..10"),
        ({"method": "dpm"}, "allowed: ancestral, ddim, dpm_solver.., sde_dpm_solver.."),
        ({"steps": 4, "method": "dpm_solver++", "order": 3}, "order=3 needs at least 5 steps"),
        ({"steps": 2, "method": "dpm_solver++"}, "order=2 needs at least 3 steps"),
        ({"method": "sde_dpm_solver++", "order": 3}, "order must be one of 1, 2 for sde_dpm_solver"),
        ({"method": "dpm_solver++", "eta": 0.5}, "takes order="),
        ({"order": 2}, "applies to method='dpm_solver..' or 'sde_dpm_solver..' only"),
        ({"steps": 5, "spacing": "middle"}, "unknown spacing 'middle'; allowed: linspace, leading, trailing, logsnr"),
        ({"eta": 1.0}, "method='ddim' only"),
        ({"method": "ddim", "variance": "beta"}, "DDIM's step is set by eta"),
        ({"method": "ddim", "eta": -1.0}, "eta must be a finite number >= 0"),
    ],
)
def test_bad_sampling_options_are_refused_with_what_is_allowed(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), 2, **kwargs)


def test_dpm_solver_and_every_spacing_sample_with_and_without_guidance():
    config = get_config("tiny")
    config.model.num_classes = 10  # a class-conditional network: classifier-free guidance through the solver
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    key = jax.random.PRNGKey(2)
    for kwargs in ({"method": "dpm_solver++"}, {"method": "dpm_solver++", "order": 3, "spacing": "trailing"},
                   {"method": "sde_dpm_solver++", "steps": 6, "spacing": "logsnr"},
                   {"method": "ddim", "steps": 4, "spacing": "leading"}):
        images = ddpm_jax.sample(checkpoint, key, 3, labels=np.array([1, 2, 3]), guidance_scale=2.0, **kwargs)
        assert images.shape == (3, 28, 28, 1) and bool(jnp.all(jnp.abs(images) <= 1)), kwargs
    # Order 1 is DDIM: the same samples from the same key, to float32 rounding.
    np.testing.assert_allclose(
        np.asarray(ddpm_jax.sample(checkpoint, key, 2, steps=5, method="dpm_solver++", order=1, labels=1)),
        np.asarray(ddpm_jax.sample(checkpoint, key, 2, steps=5, method="ddim", labels=1)), atol=1e-5)


def test_unnamed_method_and_spacing_default_to_ancestral_for_all_steps_and_the_measured_solver_for_fewer(checkpoint):
    config = checkpoint.config  # T = 10
    options = sampling_options
    assert (options(config).method, options(config).steps, options(config).spacing) == ("ancestral", None, "linspace")
    assert options(config, steps=10).method == "ancestral"  # K = T is all steps: Algorithm 2 unchanged
    few = options(config, steps=4)
    assert (few.method, few.order, few.spacing) == ("sde_dpm_solver++", 2, "trailing")
    assert (options(config, steps=2).method, options(config, steps=2).order) == ("sde_dpm_solver++", 1)
    # Ancestral's or DDIM's own knobs say which sampler was meant.
    assert (options(config, steps=4, variance="beta").method, options(config, steps=4, mean="eps").method) == (
        "ancestral", "ancestral")
    assert options(config, steps=4, method="ddim").spacing == "trailing"
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(
        ddpm_jax.sample(checkpoint, key, 2, steps=4),
        ddpm_jax.sample(checkpoint, key, 2, steps=4, method="sde_dpm_solver++", order=2, spacing="trailing"))
    ddpm_jax.sample(checkpoint, key, 2, steps=1)  # every K works with the default method
