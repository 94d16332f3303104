"""Min-SNR-gamma weighting of L_simple (Hang et al. 2023) and the presets that choose it or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.configs import get_config, schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.diffusion.losses import l_simple, min_snr_weights
from ddpm_jax.training.train import train_step
from ddpm_jax.utils.trees import count_params


def test_min_snr_weights_are_one_at_low_snr_and_gamma_over_snr_above_it():
    schedule = schedule_from_config(get_config("quick"))
    t = jnp.arange(schedule.num_timesteps)
    abar = np.asarray(schedule.alpha_bars, np.float64)
    snr = abar / (1 - abar)
    for gamma in (1.0, 5.0):
        weights = np.asarray(min_snr_weights(schedule, t, gamma))
        np.testing.assert_allclose(weights, np.minimum(snr, gamma) / snr, rtol=1e-5)
        assert (weights[snr <= gamma] == 1.0).all() and (weights[snr > gamma] < 1.0).all()
        assert np.all(np.diff(weights) >= 0)  # SNR falls with t, so the weight never does
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weights(schedule, t, 0.0)


def test_l_simple_with_min_snr_weights_each_images_error_and_reports_the_unweighted_ones():
    schedule = schedule_from_config(get_config("quick"))
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (16, 8, 8, 1), minval=-1, maxval=1)
    eps_fn = lambda x_t, t: (0.5 * x_t, None)  # noqa: E731  (any deterministic predictor)
    key = jax.random.PRNGKey(1)
    plain, per_image, t, _ = l_simple(schedule, eps_fn, x0, key)
    weighted, per_image_w, t_w, _ = l_simple(schedule, eps_fn, x0, key, min_snr_gamma=5.0)
    np.testing.assert_array_equal(per_image, per_image_w)
    np.testing.assert_array_equal(t, t_w)
    np.testing.assert_allclose(weighted, jnp.mean(min_snr_weights(schedule, t, 5.0) * per_image), rtol=1e-6)
    assert float(weighted) < float(plain)  # some of the 16 timesteps have SNR > 5
    # A gamma above every SNR weights nothing down.
    huge, *_ = l_simple(schedule, eps_fn, x0, key, min_snr_gamma=1e12)
    np.testing.assert_allclose(huge, plain, rtol=1e-6)


def test_train_state_carries_the_weighting_the_config_asks_for():
    config = get_config("tiny")
    assert create_train_state(config).min_snr_gamma is None
    config.train.loss_weighting = "min_snr"
    config.train.min_snr_gamma = 2.5
    state = create_train_state(config)
    assert state.min_snr_gamma == 2.5
    batch = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)), jnp.float32)
    schedule = schedule_from_config(config)
    _, weighted = jax.jit(lambda s, b: train_step(s, b, schedule))(state, batch)
    _, plain = jax.jit(lambda s, b: train_step(s, b, schedule))(state.replace(min_snr_gamma=None), batch)
    assert float(weighted["loss"]) < float(plain["loss"])
    # The logged per-quarter losses are the unweighted errors either way.
    np.testing.assert_allclose(weighted["loss_sum_by_quarter"], plain["loss_sum_by_quarter"], rtol=1e-6)


def test_quick_preset_is_the_old_default_and_cpu_the_class_conditional_one():
    quick, cpu = get_config("quick"), get_config("cpu")
    assert count_params(create_train_state(quick).params) == 199_025
    assert (quick.model.num_classes, quick.train.num_steps, quick.train.batch_size) == (0, 3000, 64)
    assert cpu.model.num_classes == 10 and cpu.sampling.unconditional == "label_prior"
    assert cpu.sampling.guidance_scale == 0.5 and cpu.train.num_steps > quick.train.num_steps
    # Apart from what the new default changed, the two presets are the same run (each drawing its ten
    # sample grids over its own length).
    assert quick.train.num_steps // quick.train.sample_every == cpu.train.num_steps // cpu.train.sample_every == 10
    q, c = quick.to_dict(), cpu.to_dict()
    for section, field in (("preset", None), ("model", "num_classes"), ("train", "num_steps"),
                           ("train", "sample_every"), ("sampling", "guidance_scale")):
        if field is None:
            q.pop(section), c.pop(section)
        else:
            q[section].pop(field), c[section].pop(field)
    assert q == c
