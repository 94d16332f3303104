import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.configs import schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.data import preprocess
from ddpm_jax.training.train import Batching, make_dataset_train_step, train_and_evaluate
from ddpm_jax.training.loop import EpochOrders, batch_indices


@pytest.fixture(scope="module")
def images():
    # Smooth random blobs: structured enough that a network can fit them a little.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    centres = rng.uniform(6, 22, size=(64, 2))
    blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 30.0)
    return (blobs[..., None] * 255).astype(np.uint8)


def test_preprocess_maps_pixels_to_minus_one_one_and_pads_with_background():
    u8 = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1).repeat(28, 1).repeat(14, 2)
    x = preprocess(jnp.asarray(u8), 32)
    assert x.shape == (1, 32, 32, 1)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(x[:, :2], -1.0)
    np.testing.assert_array_equal(x[:, :, -2:], -1.0)
    np.testing.assert_array_equal(ddpm_jax.data.crop(x, 28, 28), preprocess(jnp.asarray(u8), 28))


def test_each_epoch_visits_every_image_once_in_a_new_order():
    data = jnp.arange(20).reshape(20, 1, 1, 1)
    key = jax.random.PRNGKey(0)
    epochs = []
    for epoch in range(2):
        seen = [data[batch_indices(key, 20, jnp.asarray(epoch * 4 + s), 5)].ravel() for s in range(4)]
        epochs.append(np.concatenate(seen))
        assert sorted(epochs[-1].tolist()) == list(range(20))
    assert not np.array_equal(epochs[0], epochs[1])


def test_data_order_is_a_function_of_the_step_alone():
    data = jnp.arange(50).reshape(50, 1, 1, 1)
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(data[batch_indices(key, 50, jnp.asarray(7), 8)],
                                  data[batch_indices(key, 50, jnp.asarray(7), 8)])


def test_epoch_orders_give_the_batches_drawn_without_them_and_stale_ones_are_not_used():
    key = jax.random.PRNGKey(5)
    orders = EpochOrders(key, 23, 5)  # 4 steps per epoch, 3 images left over
    draw = jax.jit(lambda step, order: batch_indices(key, 23, step, 5, order))
    for step in range(10):  # across two epoch boundaries
        fresh = batch_indices(key, 23, jnp.asarray(step), 5)
        np.testing.assert_array_equal(draw(jnp.asarray(step), orders.at(step)), fresh)
    # Another epoch's order, or one drawn with another key, is not used: the same batch as ever.
    stale, foreign = EpochOrders(key, 23, 5).at(0), EpochOrders(jax.random.PRNGKey(6), 23, 5).at(8)
    for order in (stale, foreign):
        np.testing.assert_array_equal(draw(jnp.asarray(9), order), batch_indices(key, 23, jnp.asarray(9), 5))
    assert not np.array_equal(stale.permutation, orders.at(9).permutation)


def test_the_train_step_with_an_epoch_order_is_the_step_without_it(tiny_config, images):
    config = tiny_config(batch_size=8)
    config.model.base_channels = 4
    batching = Batching.from_config(config)
    step = make_dataset_train_step(schedule_from_config(config), batching)
    data = jnp.asarray(images[:40])
    with_order, without = create_train_state(config), create_train_state(config)  # each step donates its state
    orders = batching.orders(with_order, 40)
    for i in range(6):  # 5 steps per epoch: one boundary
        with_order, m_with = step(with_order, data, None, orders.at(i))
        without, m_without = step(without, data)
        assert float(m_with["loss"]) == float(m_without["loss"])
    jax.tree.map(np.testing.assert_array_equal, with_order.params, without.params)


def test_a_few_training_steps_reduce_the_loss(tiny_config, images):
    config = tiny_config(batch_size=16, learning_rate=3e-3, lr_schedule="constant", warmup_steps=0)
    config.model.base_channels = 8
    state = create_train_state(config)
    step = make_dataset_train_step(schedule_from_config(config), Batching.from_config(config))
    data = jnp.asarray(images[:16])  # one fixed batch: the loss must fall on it
    losses = []
    for _ in range(40):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert np.isclose(float(metrics["count_by_quarter"].sum()), 16)


def test_each_step_draws_its_own_noise_and_timesteps(tiny_config, images):
    # Every image identical, so the batch cannot differ: only the per-step key can change the loss.
    config = tiny_config()
    same = jnp.asarray(np.repeat(images[:1], 16, axis=0))
    step = make_dataset_train_step(schedule_from_config(config), Batching.from_config(config))
    state = create_train_state(config)
    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731  (the step donates its input)
    _, m0 = step(copy(state), same)
    _, m0_again = step(copy(state), same)
    _, m1 = step(copy(state).replace(step=jnp.asarray(1, jnp.int32)), same)
    assert float(m0["loss"]) == float(m0_again["loss"])
    assert float(m0["loss"]) != float(m1["loss"])


def test_checkpoint_round_trips_the_train_state_exactly(tiny_config, tmp_path, images):
    config = tiny_config()
    state = create_train_state(config)
    step = make_dataset_train_step(schedule_from_config(config), Batching.from_config(config))
    state, _ = step(state, jnp.asarray(images))
    manager = ckpt_lib.make_manager(str(tmp_path), config.train.keep_checkpoints)
    ckpt_lib.save(manager, state, config.to_dict())
    manager.wait_until_finished()
    restored = ckpt_lib.restore_latest(manager, create_train_state(config), config.to_dict())
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored.step) == 1
    assert json.loads(open(tmp_path / "checkpoints" / "1" / "config" / "metadata").read())["model"]["base_channels"] == 4


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=4, checkpoint_every=2)
    straight = train_and_evaluate(config, str(tmp_path / "a"), images=images, progress=False)

    train_and_evaluate(config, str(tmp_path / "b"), images=images, progress=False, stop_at=2)
    resumed = train_and_evaluate(config, str(tmp_path / "b"), images=images, progress=False)

    assert int(resumed.step) == int(straight.step) == 4
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [2, 4]


def test_resuming_with_another_model_config_names_the_differing_fields(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=2)
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    other = tiny_config(num_steps=2)
    other.model.base_channels = 8
    other.diffusion.num_timesteps = 20
    with pytest.raises(ValueError, match=r"model.base_channels: 4 -> 8.*|diffusion.num_timesteps: 10 -> 20"):
        train_and_evaluate(other, str(tmp_path), images=images, progress=False)


def test_load_checkpoint_then_sample_returns_mnist_shaped_images(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=2)
    config.data.image_size = 32  # padded like the seed preset; samples are cropped back
    config.model.levels = 2
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)

    params = ddpm_jax.load_checkpoint(str(tmp_path))
    assert params.step == 2 and params.config.model.levels == 2
    out = ddpm_jax.sample(params, jax.random.PRNGKey(0), 5)
    assert out.shape == (5, 28, 28, 1) and out.dtype == jnp.float32
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    np.testing.assert_array_equal(out, ddpm_jax.sample(params, jax.random.PRNGKey(0), 5))
    # n above the batch size: padded batches, same compiled sampler, n images back.
    assert ddpm_jax.sample(params, jax.random.PRNGKey(1), 20).shape == (20, 28, 28, 1)


def test_sample_refuses_anything_but_a_loaded_checkpoint_and_foreign_schedules(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=1)
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    params = ddpm_jax.load_checkpoint(str(tmp_path))
    with pytest.raises(TypeError, match="load_checkpoint"):
        ddpm_jax.sample(params.params, jax.random.PRNGKey(0), 2)
    other = ddpm_jax.DiffusionSchedule.from_betas(ddpm_jax.cosine_beta_schedule(20))
    with pytest.raises(ValueError, match="T=10"):
        ddpm_jax.sample(params, jax.random.PRNGKey(0), 2, schedule=other)
    same = schedule_from_config(params.config)
    assert ddpm_jax.sample(params, jax.random.PRNGKey(0), 2, schedule=same).shape == (2, 28, 28, 1)


def test_load_checkpoint_on_an_empty_directory_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="ddpm-jax-train"):
        ddpm_jax.load_checkpoint(str(tmp_path))


def test_checkpoints_keep_only_the_last_k(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=5, checkpoint_every=1, keep_checkpoints=2)
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [4, 5]
