"""The exponential moving average of the weights: its arithmetic, its warm-up, where it is saved and used."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ddpm_jax
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.configs import get_config, schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.training.train import Batching, make_dataset_train_step, train_and_evaluate
from ddpm_jax.training.state import ema_decay_at, ema_update


def test_ema_update_is_decay_times_average_plus_the_rest_times_weights():
    ema = {"w": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(-4.0)}}
    params = {"w": jnp.array([3.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    out = ema_update(ema, params, 0.75)
    np.testing.assert_allclose(out["w"], [1.5, 2.0])
    np.testing.assert_allclose(out["b"]["c"], -2.0)
    jax.tree.map(np.testing.assert_array_equal, ema_update(ema, params, 1.0), ema)
    jax.tree.map(np.testing.assert_array_equal, ema_update(ema, params, 0.0), params)


def test_warm_up_grows_the_decay_to_its_maximum():
    decays = [float(ema_decay_at(n, 0.9999)) for n in (0, 80, 890, 10**6)]
    np.testing.assert_allclose(decays, [0.1, 0.9, 0.99, 0.9999], rtol=1e-6)
    assert float(ema_decay_at(0, 0.9999, warmup=False)) == pytest.approx(0.9999)
    assert float(ema_decay_at(10**6, 0.5)) == 0.5


def test_a_train_step_moves_the_average_by_one_minus_the_decay(images):
    config = get_config("tiny")
    state = create_train_state(config)
    np.testing.assert_array_equal(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])
    before = jax.device_get(state.ema_params)  # the step donates the state's buffers
    step = make_dataset_train_step(schedule_from_config(config), Batching.from_config(config))
    new = step(state, jnp.asarray(images))
    # First update: decay 0.1 with the warm-up.
    expected = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, before, jax.device_get(new[0].params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new[0].ema_params, expected)


def test_checkpoints_name_both_weight_sets_and_sampling_uses_the_average(tmp_path, images):
    config = get_config("tiny")
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    saved = set(ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers=ckpt_lib._item_handlers())
                .item_metadata(4)["state"].keys())
    assert {"params", "ema_params"} <= saved
    loaded = ddpm_jax.load_checkpoint(str(tmp_path))
    assert loaded.weights_used == "ema"
    assert loaded.variables["params"] is loaded.ema_params
    raw = ddpm_jax.load_checkpoint(str(tmp_path), weights="raw")
    assert raw.weights_used == "raw" and raw.variables["params"] is raw.params
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(ddpm_jax.sample(loaded, key, 2, weights="raw"), ddpm_jax.sample(raw, key, 2))
    assert not np.array_equal(ddpm_jax.sample(loaded, key, 2), ddpm_jax.sample(raw, key, 2))
    with pytest.raises(ValueError, match="allowed: ema, raw"):
        loaded.with_weights("average")


def test_a_checkpoint_from_before_the_average_loads_and_resumes_with_the_average_at_its_weights(tmp_path, images):
    config = get_config("tiny")
    config.train.num_steps = 6
    state = create_train_state(config)
    old = {name: getattr(state, name) for name in ("step", "params", "batch_stats", "opt_state", "key")}
    config.data.fingerprint = ddpm_jax.data.fingerprint(images)
    manager = ckpt_lib.make_manager(str(tmp_path), config.train.keep_checkpoints)
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                            config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()
    manager.close()
    loaded = ddpm_jax.load_checkpoint(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, loaded.ema_params, loaded.params)
    state = train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    assert int(state.step) == 6
