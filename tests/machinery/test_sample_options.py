"""What ``sample()`` accepts: its options checked once, with what is allowed, and the three-argument call kept."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import get_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.sampling.options import sampling_options


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


@pytest.mark.parametrize("n", [np.int64(2), jnp.int32(2), np.array(2)])
def test_numpy_and_jax_integer_scalars_are_counts(checkpoint, n):
    assert ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), n, steps=2).shape[0] == 2


@pytest.mark.parametrize("call, error, message", [
    (lambda c: ddpm_jax.sample(c, 0, 2), TypeError, "key must be a JAX PRNG key, e.g. jax.random.PRNGKey(0)"),
    (lambda c: ddpm_jax.sample(c, "seed", 2), TypeError, "got str 'seed'"),
    (lambda c: ddpm_jax.sample(c, jax.random.PRNGKey(0), -1), ValueError, "n must be an integer >= 1, got -1"),
    (lambda c: ddpm_jax.sample(c, jax.random.PRNGKey(0), 2.0), ValueError, "n must be an integer >= 1, got 2.0"),
    (lambda c: ddpm_jax.sample(c, jax.random.PRNGKey(0), jnp.float32(2)), ValueError, "n must be an integer"),
    (lambda c: ddpm_jax.prior_labels(c, 0, 2), TypeError, "key must be a JAX PRNG key"),
    (lambda c: ddpm_jax.prior_labels(c, jax.random.PRNGKey(0), 1.5), ValueError, "n must be an integer >= 1"),
    (lambda c: ddpm_jax.prior_labels({}, jax.random.PRNGKey(0), 1), TypeError, "takes what ddpm_jax.load_checkpoint"),
])
def test_public_arguments_of_the_wrong_type_get_one_line_naming_them(checkpoint, call, error, message):
    with pytest.raises(error, match=re.escape(message)) as info:
        call(checkpoint)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"step": "4"}, ValueError, "step must be an integer >= 0, got '4'"),
    ({"step": 4.0}, ValueError, "step must be an integer >= 0, got 4.0"),
    ({"step": -1}, ValueError, "step must be an integer >= 0, got -1"),
    ({"weights": "best"}, ValueError, "weights must be 'ema' or 'raw'"),
])
def test_load_checkpoint_refuses_a_step_or_weights_of_the_wrong_kind_before_reading(
        trained_tiny_run, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ddpm_jax.load_checkpoint(str(trained_tiny_run), **kwargs)
    assert ddpm_jax.load_checkpoint(str(trained_tiny_run), step=np.int64(4)).step == 4
    with pytest.raises(TypeError, match="workdir must be a path"):
        ddpm_jax.load_checkpoint(4)
