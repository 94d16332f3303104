"""The noise-aware classifier p(y | x_t, t) for classifier guidance: network, training, checkpoints, command line."""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax.training import noisy_classifier as nc

from ddpm_jax.training import noisy_classifier_training as nct
from ddpm_jax.training.checkpoint import load_checkpoint
from ddpm_jax.configs import get_config
from ddpm_jax.data import fingerprint, load_mnist_idx
from ddpm_jax.models.noisy_classifier import NoisyClassifier
from ddpm_jax.training.noisy_classifier import noisy_classifier_config
from ddpm_jax.training.train import train_and_evaluate
from ddpm_jax.utils.trees import count_params
from experiments import noisy_classifier as cli

ROOT = Path(__file__).resolve().parents[2]
# Real MNIST in IDX form, kept next to the checkout (../shared in CI), as tests/machinery/test_evaluation.py finds it.
MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def small_config(**train):
    """Two narrow stages (28 -> 14) and a few steps: the machinery, not the accuracy."""
    config = noisy_classifier_config()  # bound at import: the CLI test swaps nc.noisy_classifier_config for this
    config.model.stage_channels = (8, 16)
    config.model.time_embed_dim = 8
    config.train.update(num_steps=4, batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=2, eval_batch_size=5)
    config.train.update(train)
    return config


def init_params(model_config, size: int = 28):
    init = jax.jit(nc.build_noisy_classifier(model_config).init)
    return init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)), jnp.zeros((1,), jnp.int32))["params"]


# ---------------------------------------------------------------------------
# The network and the functions a guided sampler calls
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32])
def test_default_network_gives_float32_logits_per_image_at_28_and_32_pixels(size):
    model = NoisyClassifier()
    x, t = jnp.zeros((3, size, size, 1)), jnp.array([0, 50, 99], jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]  # shapes only: nothing compiles
    logits = jax.eval_shape(model.apply, {"params": params}, x, t)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert count_params(params) == 108_074  # well under 0.5M; the cpu preset's U-Net has 199,025


def test_network_rejects_sizes_its_poolings_cannot_halve_and_widths_groups_cannot_split():
    with pytest.raises(ValueError, match="divisible by 4"):
        NoisyClassifier().init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 1)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="divisible by groups=8"):
        NoisyClassifier(stage_channels=(12, 24)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))


def test_log_probs_are_normalized_and_the_gradient_wrt_x_finite_nonzero_and_each_images_own():
    # Frozen, so hashable: jit can take it as a static argument (a checkpoint's config.model is frozen).
    model_config = ml_collections.FrozenConfigDict(small_config().model)
    params = init_params(model_config)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
    t, y = jnp.array([1, 4, 9], jnp.int32), jnp.array([3, 7, 1], jnp.int32)

    @functools.partial(jax.jit, static_argnums=0)  # one compilation for all of it: the tests run XLA at -O0
    def everything(model_config, params, x, t, y):
        log_probs = nc.log_prob_fn(model_config)(params, x, t)
        grad = nc.class_log_prob_grad(model_config, params, x, t, y)
        # What a guided sampler computes: the gradient of sum_i log p(y_i | x_i, t_i).
        by_hand = jax.grad(lambda x: jnp.sum(nc.classifier_log_probs(model_config, params, x, t)[jnp.arange(3), y]))(x)
        alone = nc.class_log_prob_grad(model_config, params, x[1:2], t[1:2], y[1:2])
        # What training computes, with XLA's convolutions (the sampler's functions may use matrix products).
        trained = jax.nn.log_softmax(nc.build_noisy_classifier(model_config, "xla").apply({"params": params}, x, t))
        return log_probs, grad, by_hand, alone, trained

    log_probs, grad, by_hand, alone, trained = everything(model_config, params, x, t, y)
    assert log_probs.shape == (3, 10)
    np.testing.assert_allclose(log_probs, trained, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=-1), 1.0, rtol=1e-5)
    assert grad.shape == x.shape and np.all(np.isfinite(grad))
    assert np.all(np.abs(np.asarray(grad)).reshape(3, -1).max(axis=1) > 0)
    np.testing.assert_allclose(grad, by_hand, rtol=1e-5, atol=1e-7)
    # No BatchNorm: an image's gradient does not depend on the rest of the batch.
    np.testing.assert_allclose(grad[1:2], alone, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Training, checkpoints, resuming (random images, tiny schedule: the machinery)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(images):
    return images, np.random.default_rng(1).integers(0, 10, len(images)).astype(np.int32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, labelled):
    images, labels = labelled
    workdir = tmp_path_factory.mktemp("nc") / "noisy_classifier"
    classifier = nct.train_noisy_classifier(get_config("tiny"), images, labels, str(workdir), config=small_config(),
                                           test_images=images[:12], test_labels=labels[:12], progress=False)
    return workdir, classifier


def test_training_saves_checkpoints_its_config_metrics_and_test_accuracy(trained, labelled):
    workdir, classifier = trained
    assert classifier.step == 4
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    saved = json.loads((workdir / "config.json").read_text())
    assert set(saved) == {"model", "train", "diffusion", "data"}
    assert saved["diffusion"] == get_config("tiny").diffusion.to_dict()
    assert saved["data"] == {"image_size": 28, "channels": 1, "fingerprint": fingerprint(*labelled)}
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    accuracy = nc.read_accuracy(workdir)
    assert accuracy["step"] == 4 and accuracy["num_examples"] == 12 and accuracy["num_timesteps"] == 10
    # T = 10: quarters t*4//10 are {0,1,2}, {3,4}, {5,6,7}, {8,9}; 12 images, three per quarter.
    assert accuracy["quarters"] == [[0, 3], [3, 5], [5, 8], [8, 10]] and accuracy["count_by_quarter"] == [3] * 4


def test_save_then_load_gives_identical_logits(trained):
    workdir, classifier = trained
    loaded = nc.load_noisy_classifier(str(workdir))
    assert loaded.step == 4 and loaded.config == classifier.config
    x, t = jax.random.normal(jax.random.PRNGKey(2), (5, 28, 28, 1)), jnp.arange(5, dtype=jnp.int32)
    log_probs = jax.jit(lambda c: c.log_probs(x, t))  # the checkpoint passes through jit; its config is static
    np.testing.assert_array_equal(log_probs(loaded), log_probs(classifier))


def test_a_run_killed_after_a_checkpoint_resumes_there_and_ends_where_an_uninterrupted_run_does(
        trained, labelled, tmp_path, capsys):
    workdir, whole = trained
    images, labels = labelled
    resumed_dir = tmp_path / "noisy_classifier"
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")  # as if killed between steps 2 and 4
    resumed = nct.train_noisy_classifier(get_config("tiny"), images, labels, str(resumed_dir), config=small_config(),
                                        progress=False)
    assert "resuming the noisy classifier from step 2" in capsys.readouterr().out
    assert resumed.step == 4
    # Same batches, timesteps and noise per step (keys folded from the step): the same weights.
    jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
    assert [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_resuming_with_another_network_or_other_data_is_refused(trained, labelled, tmp_path):
    workdir, _ = trained
    images, labels = labelled
    other = tmp_path / "noisy_classifier"
    shutil.copytree(workdir, other)
    wider = small_config()
    wider.model.stage_channels = (16, 16)
    with pytest.raises(ValueError, match="model.stage_channels"):
        nct.train_noisy_classifier(get_config("tiny"), images, labels, str(other), config=wider, progress=False)
    with pytest.raises(ValueError, match="data.fingerprint"):
        nct.train_noisy_classifier(get_config("tiny"), images, (labels + 1) % 10, str(other), config=small_config(),
                                  progress=False)


def test_check_classifier_matches_names_what_differs(trained):
    _, classifier = trained
    nc.check_classifier_matches(classifier, get_config("tiny"))  # the schedule it was trained for
    linear = get_config("tiny")
    linear.diffusion.schedule = "linear"
    with pytest.raises(ValueError, match="diffusion.schedule: 'cosine' -> 'linear'"):
        nc.check_classifier_matches(classifier, linear)
    with pytest.raises(ValueError, match="diffusion.num_timesteps: 10 -> 100"):
        nc.check_classifier_matches(classifier, get_config("cpu"))
    padded = get_config("tiny")
    padded.data.image_size = 32
    with pytest.raises(ValueError, match="data.image_size: 28 -> 32"):
        nc.check_classifier_matches(classifier, padded)


def test_loading_where_there_is_no_classifier_names_the_folder_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        nc.load_noisy_classifier(str(tmp_path / "run" / "noisy_classifier"))
    message = str(e.value)
    assert str(tmp_path / "run" / "noisy_classifier") in message
    assert f"python -m experiments.noisy_classifier --workdir {tmp_path / 'run'}" in message


# ---------------------------------------------------------------------------
# Real MNIST: the classifier learns to read noisy digits
# ---------------------------------------------------------------------------

# In a fresh process at XLA's default optimization level: the conftest's level 0 (faster compiles) runs this
# network's training step about 5x slower. 300 steps of (16, 32, 64) at batch 64, lr 3e-3.
_REAL_MNIST_SCRIPT = """
import json, sys
from ddpm_jax.training import noisy_classifier as nc
from ddpm_jax.training import noisy_classifier_training as nct
from ddpm_jax.configs import get_config
from ddpm_jax.data import load_mnist_idx
(train_x, train_y), (test_x, test_y) = load_mnist_idx(sys.argv[1], "train"), load_mnist_idx(sys.argv[1], "test")
config = nc.noisy_classifier_config()
config.model.stage_channels = (16, 32, 64)
config.train.update(num_steps=300, batch_size=64, learning_rate=3e-3, warmup_steps=20, log_every=100)
classifier = nct.train_noisy_classifier(get_config("cpu"), train_x, train_y, sys.argv[2], config=config,
                                       test_images=test_x[:2000], test_labels=test_y[:2000], progress=False)
print(json.dumps(nc.read_accuracy(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def mnist_dir():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST IDX files not found in {MNIST_DIR}")
    return MNIST_DIR


def test_short_training_on_real_mnist_reads_lightly_noised_digits(mnist_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _REAL_MNIST_SCRIPT, str(mnist_dir), str(tmp_path / "nc")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy = json.loads(out.stdout.strip().splitlines()[-1])
    by_quarter = accuracy["accuracy_by_quarter"]
    # Measured (T = 100 cosine, 500 test images per quarter): [0.928, 0.886, 0.712, 0.254]; chance is 0.10.
    assert by_quarter[0] >= 0.80, by_quarter
    assert by_quarter[0] >= by_quarter[1] - 0.05 and by_quarter[1] > by_quarter[3], by_quarter  # noise hurts
    assert accuracy["accuracy"] > 0.5, accuracy


# ---------------------------------------------------------------------------
# python -m experiments.noisy_classifier
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, idx_dir):
    train_x, _ = load_mnist_idx(idx_dir, "train")
    config = get_config("tiny")
    config.train.num_steps = 1
    config.data.max_train_examples = 32  # the classifier must see the same first 32 images
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    train_and_evaluate(config, str(workdir), images=train_x, progress=False)
    return workdir


def test_cli_trains_into_the_run_and_prints_accuracy_per_quarter(tiny_run, idx_dir, capsys, monkeypatch):
    monkeypatch.setattr(nc, "noisy_classifier_config", small_config)  # a narrower network compiles faster
    code = cli.main(["--workdir", str(tiny_run), "--idx-dir", str(idx_dir), "--steps", "3", "--batch-size", "8",
                     "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("t in [") == 4 and "test accuracy on 12 noised test images" in out
    folder = tiny_run / "noisy_classifier"
    classifier = nc.load_noisy_classifier(str(folder))
    assert classifier.step == 3 and classifier.config.train.batch_size == 8
    assert classifier.config.diffusion == load_checkpoint(str(tiny_run)).config.diffusion
    train_x, train_y = load_mnist_idx(idx_dir, "train")
    assert classifier.config.data.fingerprint == fingerprint(train_x[:32], train_y[:32])  # the run's 32 images
    nc.check_classifier_matches(classifier, load_checkpoint(str(tiny_run)))  # a DiffusionCheckpoint works too
    assert nc.read_accuracy(folder)["step"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "33"], "train.batch_size=33 is not allowed: an integer from 1 to the 32 training images"),
        (["--steps", "0"], "train.num_steps=0"),
    ],
)
def test_cli_bad_values_get_one_error_line_and_exit_status_2(tiny_run, idx_dir, tmp_path, capsys, flags, message):
    assert cli.main(["--workdir", str(tiny_run), "--idx-dir", str(idx_dir), "--out", str(tmp_path / "nc"),
                     "--no-progress"] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_diffusion_runs_folder_is_not_taken_for_a_classifier(tiny_run, tmp_path, labelled):
    steps = sorted(os.listdir(tiny_run / "checkpoints"))
    with pytest.raises(ValueError, match="holds checkpoints of a diffusion run, not of a noisy classifier"):
        nc.load_noisy_classifier(str(tiny_run))
    images, labels = labelled
    with pytest.raises(ValueError, match=str(tiny_run / "noisy_classifier")):
        nct.train_noisy_classifier(get_config("tiny"), images, labels, str(tiny_run), config=small_config(),
                                  progress=False)
    # A refusal is not damage: the run's intact checkpoints stay where they are.
    assert sorted(os.listdir(tiny_run / "checkpoints")) == steps and not (tiny_run / "damaged_checkpoints").exists()


def test_cli_without_a_diffusion_run_says_how_to_train_one(tmp_path, idx_dir, capsys):
    assert cli.main(["--workdir", str(tmp_path / "nowhere"), "--idx-dir", str(idx_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ddpm-jax-train" in err
