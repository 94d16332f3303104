import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.sampling import make_ancestral_sampler
from ddpm_jax.schedules import DiffusionSchedule, cosine_beta_schedule, linear_beta_schedule

SHAPE = (3, 8, 8, 1)


def _oracle(schedule, target):
    """The exact eps for data that is a single image: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""

    def eps_fn(variables, x, t):
        s = schedule.sqrt_alpha_bars[t][:, None, None, None]
        r = schedule.sqrt_one_minus_alpha_bars[t][:, None, None, None]
        return (x - s * target) / r

    return eps_fn


def _toy_eps(variables, x, t):
    return variables["w"] * x + 1e-3 * t[:, None, None, None].astype(jnp.float32)


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_betas(cosine_beta_schedule(20))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("mean", ["x0_clip", "eps"])
def test_sampling_with_the_exact_noise_recovers_a_single_data_point(schedule, variance, mean):
    # For data that is one image the optimal eps predicts it exactly, and the last step adds no noise,
    # so Algorithm 2 must land on that image whatever x_T and the noise were.
    target = jnp.linspace(-0.9, 0.9, 64).reshape(1, 8, 8, 1)
    sampler = jax.jit(make_ancestral_sampler(_oracle(schedule, target), schedule, SHAPE, variance=variance, mean=mean))
    out = sampler({}, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out, jnp.broadcast_to(target, SHAPE), atol=1e-4)


def test_same_key_same_samples_other_key_other_samples(schedule):
    sampler = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE))
    a = sampler({"w": 0.1}, jax.random.PRNGKey(1))
    b = sampler({"w": 0.1}, jax.random.PRNGKey(1))
    c = sampler({"w": 0.1}, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


@pytest.mark.parametrize("mean", ["x0_clip", "eps"])
def test_samples_are_finite_and_each_image_draws_its_own_noise(schedule, mean):
    # (Their range needs no test: the sampler clips x_0 to [-1, 1].) A chain that shared its noise across the
    # batch, or one that blew up to NaN, would fail here.
    out = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, mean=mean))({"w": 0.5}, jax.random.PRNGKey(3))
    assert out.shape == SHAPE
    assert bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.min(jnp.max(jnp.abs(out[1:] - out[0]), axis=(1, 2, 3)))) > 1e-3


def test_intermediates_run_from_noise_to_the_returned_sample(schedule):
    sampler = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, return_every=5))
    x0, frames = sampler({"w": 0.2}, jax.random.PRNGKey(5))
    assert frames.shape == (5,) + SHAPE  # after 0, 5, 10, 15 and all 20 steps
    np.testing.assert_array_equal(frames[-1], x0)
    # The first frame is x_T ~ N(0, I) before any step: the plain sampler's x_T is the same draw.
    plain = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE))({"w": 0.2}, jax.random.PRNGKey(5))
    np.testing.assert_array_equal(plain, x0)
    assert float(jnp.std(frames[0])) > 0.5


def test_beta_and_beta_tilde_variances_give_different_chains():
    schedule = DiffusionSchedule.from_betas(linear_beta_schedule(20, 1e-3, 0.2))
    a = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, variance="beta"))({"w": 0.1}, jax.random.PRNGKey(6))
    b = jax.jit(make_ancestral_sampler(_toy_eps, schedule, SHAPE, variance="beta_tilde"))({"w": 0.1}, jax.random.PRNGKey(6))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_unknown_options_are_refused_with_allowed_values(schedule):
    with pytest.raises(ValueError, match="beta, beta_tilde, learned"):
        make_ancestral_sampler(_toy_eps, schedule, SHAPE, variance="large")
    with pytest.raises(ValueError, match="x0_clip, eps"):
        make_ancestral_sampler(_toy_eps, schedule, SHAPE, mean="v")


def test_batchnorm_option_switches_the_statistics_sampling_normalizes_with():
    import jax.numpy as jnp

    from ddpm_jax.checkpoint import DiffusionCheckpoint
    from ddpm_jax.generate import sample
    from ddpm_jax.configs import get_config
    from ddpm_jax.train_state import create_train_state

    config = get_config("tiny")
    state = create_train_state(config)
    # Running statistics far from any batch's, so the two modes must disagree.
    stats = jax.tree.map(lambda s: s + 3.0, state.batch_stats)
    checkpoint = DiffusionCheckpoint.from_train_state(state.replace(batch_stats=stats), config)
    key = jax.random.PRNGKey(0)
    running = sample(checkpoint, key, 4)
    np.testing.assert_array_equal(running, sample(checkpoint, key, 4, batchnorm="running"))
    batch = sample(checkpoint, key, 4, batchnorm="batch")
    assert batch.shape == running.shape and not np.array_equal(batch, running)
    for a, b in zip(jax.tree.leaves(checkpoint.batch_stats), jax.tree.leaves(stats)):
        np.testing.assert_array_equal(a, b)  # sampling never writes the running averages
    with pytest.raises(ValueError, match="unknown batchnorm 'mixed'"):
        sample(checkpoint, key, 4, batchnorm="mixed")
    # A network without BatchNorm samples the same either way.
    ddpm = get_config("tiny")
    ddpm.model.update(name="ddpm_unet", base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(), norm_groups=4)
    plain = DiffusionCheckpoint.from_train_state(create_train_state(ddpm), ddpm)
    np.testing.assert_array_equal(sample(plain, key, 2, batchnorm="batch"), sample(plain, key, 2))
    assert jnp.isfinite(batch).all()


def test_batchnorm_check_reports_the_three_normalizations(tmp_path, idx_dir, capsys):
    import json

    from experiments import batchnorm_check, mnist

    workdir = tmp_path / "run"
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--steps", "2",
                       "--no-progress"]) == 0
    assert batchnorm_check.main(["--workdir", str(workdir), "--idx-dir", str(idx_dir), "--num-images", "12",
                                 "--batch-size", "4"]) == 0
    report = json.loads((workdir / "batchnorm_check.json").read_text())["eps_mse_by_quarter_smallest_t_first"]
    for name in ("running", "mixed_batch", "per_t_batch", "recalibrated"):
        assert len(report[name]) == 4 and np.isfinite(report["overall"][name])
    # Three batches at one timestep each: t = 0, 3, 6 of T = 10, i.e. quarters 0, 1 and 2.
    assert report["per_t_batch"][3] == 0.0 and all(v > 0 for v in report["per_t_batch"][:3])
    assert "mixed_batch" in capsys.readouterr().out
    assert batchnorm_check.main(["--workdir", str(workdir), "--idx-dir", str(idx_dir), "--num-images", "4",
                                 "--batch-size", "8"]) == 2


def test_recalibrated_batch_stats_are_the_average_of_the_batches_statistics(idx_dir):
    import jax.numpy as jnp

    from ddpm_jax.checkpoint import DiffusionCheckpoint
    from ddpm_jax.batchnorm_stats import recalibrate_batch_stats
    from ddpm_jax.configs import get_config
    from ddpm_jax.data import load_mnist
    from ddpm_jax.train_state import create_train_state

    images, labels = load_mnist("train", idx_dir=str(idx_dir))
    config = get_config("tiny")
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    key = jax.random.PRNGKey(0)
    one = recalibrate_batch_stats(checkpoint, images, key, num_batches=1, batch_size=8)
    # One batch: the statistics of that batch, which a momentum-0 running average would hold.
    means = [np.asarray(x) for x in jax.tree.leaves(one.batch_stats)]
    assert all(np.isfinite(m).all() for m in means)
    assert not all(np.array_equal(a, b) for a, b in zip(means, jax.tree.leaves(checkpoint.batch_stats)))
    two = recalibrate_batch_stats(checkpoint, images, key, num_batches=2, batch_size=8)
    second = jax.tree.map(lambda a, b: 2 * a - b, two.batch_stats, one.batch_stats)  # the second batch's own
    for s in jax.tree.leaves(second):
        assert np.isfinite(np.asarray(s)).all()
    variances = [v for path, v in jax.tree_util.tree_flatten_with_path(two.batch_stats)[0] if "var" in str(path)]
    assert variances and all((np.asarray(v) > 0).all() for v in variances)
    for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(checkpoint.params)):
        assert jnp.array_equal(a, b)  # only the statistics change
    with pytest.raises(ValueError, match="batch_size=41"):
        recalibrate_batch_stats(checkpoint, images, key, batch_size=41)
    conditional = get_config("tiny")
    conditional.model.num_classes = 10
    cond = DiffusionCheckpoint.from_train_state(create_train_state(conditional), conditional)
    with pytest.raises(ValueError, match="needs the images' labels"):
        recalibrate_batch_stats(cond, images, key)
    assert recalibrate_batch_stats(cond, images, key, labels=labels, num_batches=1, batch_size=8).batch_stats
