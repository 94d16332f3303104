"""Ho et al.'s U-Net (the ``ddpm`` preset): shapes, attention, dropout, and that it trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.configs import build_model, get_config, schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.models import DDPMUNet
from ddpm_jax.training.train import Batching, make_dataset_train_step
from ddpm_jax.utils.trees import count_params


def _small(**fields):
    config = get_config("ddpm")
    config.model.base_channels = 8
    for k, v in fields.items():
        config.model[k] = v
    return config


@pytest.mark.parametrize("learn_variance, channels", [(False, 1), (True, 2)])
def test_output_has_the_image_shape_or_twice_its_channels_for_a_learned_variance(learn_variance, channels):
    config = _small(learn_variance=learn_variance)
    model = build_model(config.model)
    x, t = jnp.ones((3, 28, 28, 1)), jnp.array([0, 50, 99])
    variables = model.init(jax.random.PRNGKey(0), x, t)
    out = model.apply(variables, x, t)
    assert out.shape == (3, 28, 28, channels) and out.dtype == jnp.float32
    # Self-attention where the maps are 7x7 (and in the middle), none at 28 or 14.
    names = list(variables["params"])
    # The preset's one encoder block at 7x7, the middle, and the decoder's two blocks at 7x7.
    assert sum(n.startswith("AttentionBlock") for n in names) == 4
    assert "batch_stats" not in variables  # GroupNorm: nothing to track


def test_dropout_acts_in_training_only():
    model = build_model(_small(dropout=0.5).model)
    x, t = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1)), jnp.array([3, 40])
    variables = model.init(jax.random.PRNGKey(0), x, t)
    # Give the zero-initialized output layers weights, so that dropout can show in the output.
    variables = jax.tree.map(lambda p: p + 0.05, variables)
    train = [model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(k)}) for k in (1, 2)]
    assert not np.allclose(train[0], train[1])
    np.testing.assert_array_equal(model.apply(variables, x, t), model.apply(variables, x, t))


def test_sizes_the_downsamplings_cannot_divide_are_refused():
    model = DDPMUNet(base_channels=8, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="divisible by 8, got 28x28"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))


def test_the_ddpm_preset_trains_its_loss_down():
    config = _small()
    config.train.batch_size = 16
    config.train.warmup_steps = 0
    config.train.lr_schedule = "constant"
    state = create_train_state(config)
    assert count_params(state.params) > 0
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    centres = rng.uniform(8, 20, size=(64, 2))
    blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 20.0)
    images = jnp.asarray((blobs[..., None] * 255).astype(np.uint8))
    step = make_dataset_train_step(schedule_from_config(config), Batching.from_config(config))
    losses = []
    for _ in range(30):
        state, metrics = step(state, images)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_the_cifar10_preset_is_ho_et_al_s_network_of_35_746_307_parameters():
    # The count of diffusers' UNet2DModel as in the released google/ddpm-cifar10-32 weights, and of Ho et al.'s
    # TF network: 128 base channels, multipliers (1, 2, 2, 2), 2 residual blocks, attention at 16x16.
    config = get_config("cifar10")
    model = build_model(config.model)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                  jnp.zeros((1,), jnp.int32)))
    assert count_params(variables["params"]) == 35_746_307
    names = list(variables["params"])
    assert sum(n.startswith("AttentionBlock") for n in names) == 2 + 1 + 3  # encoder at 16x16, middle, decoder
    c = config
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.train.batch_size, c.train.learning_rate,
            c.train.warmup_steps, c.train.num_steps, c.train.grad_clip_norm, c.train.ema_decay, c.data.random_flip,
            c.model.dropout, c.model.norm_groups) == ("linear", 1000, 128, 2e-4, 5000, 800_000, 1.0, 0.9999, True,
                                                      0.1, 32)


@pytest.mark.parametrize("learn_variance", [False, True])
def test_an_rgb_network_outputs_three_channels_per_prediction(learn_variance):
    model = build_model(_small(learn_variance=learn_variance).model)
    x, t = jnp.ones((2, 28, 28, 3)), jnp.array([0, 9])
    out = model.apply(model.init(jax.random.PRNGKey(0), x, t), x, t)
    assert out.shape == (2, 28, 28, 6 if learn_variance else 3)
