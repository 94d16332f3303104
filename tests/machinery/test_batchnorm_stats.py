"""BatchNorm statistics while sampling: running or per-batch, the check that compares them, and their
recalibration ("precise BN") from training batches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.evaluation.batchnorm_stats import recalibrate_batch_stats
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import get_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.data import load_mnist
from ddpm_jax.sampling.generate import sample
from ddpm_jax.cli import train as mnist
from experiments import batchnorm_check


def test_batchnorm_option_switches_the_statistics_sampling_normalizes_with():
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
