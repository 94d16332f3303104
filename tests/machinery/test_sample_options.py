"""What ``sample()`` accepts: its options checked once, with what is allowed, and the three-argument call kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import create_train_state, get_config


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
        ({"method": "dpm"}, "allowed: ancestral, ddim"),
        ({"eta": 1.0}, "method='ddim' only"),
        ({"method": "ddim", "variance": "beta"}, "DDIM's step is set by eta"),
        ({"method": "ddim", "eta": -1.0}, "eta must be a finite number >= 0"),
    ],
)
def test_bad_sampling_options_are_refused_with_what_is_allowed(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), 2, **kwargs)
