"""The feature classifier, its cache, the evaluation machinery and `python -m experiments.evaluate`, on real MNIST."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from ddpm_jax.evaluation import evaluate as evaluation

from ddpm_jax.evaluation import feature_network

from ddpm_jax.evaluation import metrics
from ddpm_jax.training.checkpoint import DiffusionCheckpoint, load_checkpoint
from ddpm_jax.configs import get_classifier_config, get_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.data import load_mnist_idx
from ddpm_jax.cli import evaluate
from ddpm_jax.cli import train as mnist

# Real MNIST in IDX form, kept next to the checkout (../shared in CI).
MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
SHORT_EPOCHS = 2  # about half a minute on 2 cores


@pytest.fixture(scope="module")
def mnist_dir():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST IDX files not found in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="module")
def splits(mnist_dir):
    return load_mnist_idx(mnist_dir, "train"), load_mnist_idx(mnist_dir, "test")


@pytest.fixture(scope="module")
def short_config():
    config = get_classifier_config()
    config.train.num_epochs = SHORT_EPOCHS
    return config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def network(splits, short_config, cache_dir):
    (train_x, train_y), (test_x, test_y) = splits
    return feature_network.load_or_train_feature_network(
        train_x, train_y, test_x, test_y, cache_dir=cache_dir, config=short_config, log=lambda _: None
    )


def test_classifier_reaches_97_percent_after_a_short_training(network, splits):
    (_, _), (test_x, test_y) = splits
    assert network.test_accuracy >= 0.97, network.test_accuracy
    assert network.accuracy(test_x, test_y) == pytest.approx(network.test_accuracy)
    assert network.info["train_examples"] == 10_000 and network.info["test_examples"] == 10_000


def test_cached_classifier_is_reused_not_retrained(network, splits, short_config, cache_dir, monkeypatch):
    (train_x, train_y), (test_x, test_y) = splits

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(feature_network, "train_classifier", no_training)
    again = feature_network.load_or_train_feature_network(
        train_x, train_y, test_x, test_y, cache_dir=cache_dir, config=short_config, log=lambda _: None
    )
    assert again.test_accuracy == network.test_accuracy
    assert again.name == network.name
    jax.tree.map(np.testing.assert_array_equal, again.params, network.params)


def test_cache_entry_depends_on_the_training_data_and_the_config(network, splits, short_config, cache_dir, monkeypatch):
    (train_x, train_y), (test_x, test_y) = splits
    calls = []

    def fake_training(images, labels, config, **kwargs):
        calls.append(len(images))
        return network.params, {"steps": 1, "epochs": 1.0, "train_loss": 0.0, "train_accuracy": 0.0, "train_seconds": 0.0}

    monkeypatch.setattr(feature_network, "train_classifier", fake_training)
    quiet = {"cache_dir": cache_dir, "log": lambda _: None}
    subset = feature_network.load_or_train_feature_network(train_x[:5000], train_y[:5000], test_x, test_y,
                                                      config=short_config, **quiet)
    other_config = get_classifier_config()
    other_config.train.num_epochs = SHORT_EPOCHS + 1
    retuned = feature_network.load_or_train_feature_network(train_x, train_y, test_x, test_y, config=other_config, **quiet)
    assert calls == [5000, 10_000]
    assert len({network.name, subset.name, retuned.name}) == 3


def test_histogram_of_labelled_real_images_reproduces_their_labels(network, splits):
    (_, _), (test_x, test_y) = splits
    probs, _ = network(test_x[:2000])
    counts = metrics.digit_histogram(probs.argmax(-1))
    true_counts = np.bincount(test_y[:2000], minlength=10)
    assert counts.sum() == 2000
    # A >= 97% classifier moves at most a few percent of the images between bins.
    assert np.abs(counts - true_counts).sum() <= 0.06 * 2000, (counts, true_counts)
    assert metrics.kl_to_uniform(counts) == pytest.approx(metrics.kl_to_uniform(true_counts), abs=0.01)


def test_fid_in_classifier_features_is_zero_for_the_same_images_and_grows_with_noise(network, splits):
    (train_x, _), (test_x, _) = splits
    _, test_f = network(test_x[:3000])
    _, train_f = network(train_x[:3000])
    assert metrics.fid(test_f, test_f) == pytest.approx(0.0, abs=1e-6)
    real_gap = metrics.fid(train_f, test_f)
    rng = np.random.default_rng(0)
    noised = []
    for sigma in (32, 64, 128):
        noisy = np.clip(test_x[:3000] + rng.normal(0, sigma, test_x[:3000].shape), 0, 255).astype(np.uint8)
        noised.append(metrics.fid(network(noisy)[1], test_f))
    assert 0 < noised[0] < noised[1] < noised[2], noised
    # Other real digits are closer to the test images than heavily noised copies of those very images.
    assert real_gap < noised[2], (real_gap, noised)


def test_feature_network_refuses_float_images(network):
    with pytest.raises(ValueError, match="to_uint8"):
        network(np.zeros((4, 28, 28, 1), np.float32))


def test_cached_features_are_computed_once(network, splits, cache_dir, monkeypatch):
    (_, _), (test_x, _) = splits
    first = evaluation.cached_features(network, test_x[:500], cache_dir)
    monkeypatch.setattr(feature_network.FeatureNetwork, "__call__", lambda *a, **k: pytest.fail("recomputed"))
    second = evaluation.cached_features(network, test_x[:500], cache_dir)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def _untrained_tiny_checkpoint():
    config = get_config("tiny")
    return DiffusionCheckpoint.from_train_state(create_train_state(config), config)


def test_draw_samples_resumes_from_saved_batches_with_the_same_result(tmp_path, monkeypatch):
    checkpoint = _untrained_tiny_checkpoint()
    key = jax.random.PRNGKey(3)
    whole = evaluation.draw_samples(checkpoint, key, 10, batch_size=4, chunk_dir=tmp_path)
    assert whole.shape == (10, 28, 28, 1) and whole.dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_00000.npy", "batch_00001.npy", "batch_00002.npy"]
    (tmp_path / "batch_00001.npy").unlink()  # as if killed while drawing batch 1

    drawn = []
    real_sample = evaluation.sample
    monkeypatch.setattr(evaluation, "sample", lambda *a, **k: drawn.append(1) or real_sample(*a, **k))
    resumed = evaluation.draw_samples(checkpoint, key, 10, batch_size=4, chunk_dir=tmp_path)
    assert len(drawn) == 1
    np.testing.assert_array_equal(resumed, whole)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_dir):
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(mnist_dir), "--workdir", str(workdir), "--steps", "2",
                       "--no-progress"]) == 0
    return workdir


def test_evaluate_writes_eval_json_and_the_plots(tmp_path, tiny_run, mnist_dir, network, monkeypatch, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    code = evaluate.main(["--workdir", str(workdir), "--idx-dir", str(mnist_dir), "--num-samples", "30",
                          "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    report = json.loads((workdir / "eval.json").read_text())
    for key in ("fid", "fid_floor", "histogram", "kl_to_uniform", "unreadable_rate", "classifier_test_accuracy",
                "num_samples", "precision", "recall"):
        assert key in report, key
    assert report["num_samples"] == 30 and sum(report["histogram"].values()) == 30
    assert report["floor"]["num_samples"] == 30
    # Two training steps make noise, not digits: far from the real-data floor.
    assert report["fid"] > report["fid_floor"] >= 0
    for name in ("eval_samples.png", "eval_histogram.png", "eval_least_confident.png"):
        assert (workdir / name).stat().st_size > 1000, name
    # Both feature spaces, each from its shipped network, each FID and unreadable rate with its spread.
    assert list(report["spaces"]) == ["cnn", "resnet"] and report["primary_space"] == "cnn"
    assert report["spaces"]["cnn"]["fid"] == report["fid"]
    for space in report["spaces"].values():
        assert space["classifier"]["shipped"] and space["fid_std"] > 0 and space["kid"] > space["kid_std"] > 0
        assert space["fid"] > space["floor"]["fid"] and 0 <= space["unreadable_rate_std"] < 0.2
    assert report["spaces"]["cnn"]["classifier"]["sha256"] != report["spaces"]["resnet"]["classifier"]["sha256"]
    out = capsys.readouterr().out
    assert "cnn (cnn)" in out and "resnet (resnet)" in out and "KID" in out and " ± " in out


def test_evaluate_with_steps_and_no_method_samples_as_sample_does(tmp_path, tiny_run, mnist_dir, network,
                                                                    monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    common = ["--workdir", str(workdir), "--idx-dir", str(mnist_dir), "--num-samples", "6", "--batch-size", "6",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert evaluate.main(common + ["--steps", "4"]) == 0
    sampling = json.loads((workdir / "eval.json").read_text())["sampling"]
    assert (sampling["method"], sampling["order"], sampling["spacing"], sampling["steps"]) == (
        "sde_dpm_solver++", 2, "trailing", 4)
    drawn = np.concatenate([np.load(p) for p in sorted(Path(sampling["chunk_dir"]).glob("batch_*.npy"))])
    checkpoint = load_checkpoint(str(workdir))
    expected = evaluation.draw_samples(checkpoint, jax.random.PRNGKey(0), 6, batch_size=6, steps=4)
    np.testing.assert_array_equal(drawn, expected)
    assert evaluate.main(common) == 0  # all T steps: Algorithm 2, as before
    sampling = json.loads((workdir / "eval.json").read_text())["sampling"]
    assert (sampling["method"], sampling["spacing"]) == ("ancestral", "linspace")


def test_evaluate_never_reuses_samples_of_a_checkpoint_that_was_replaced(tmp_path, tiny_run, mnist_dir, network,
                                                                        trained_tiny_run, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    common = ["--workdir", str(workdir), "--idx-dir", str(mnist_dir), "--num-samples", "8", "--batch-size", "4",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]

    def evaluated():
        assert evaluate.main(common) == 0
        return json.loads((workdir / "eval.json").read_text())

    first, again = evaluated(), evaluated()
    assert (first["sampling"]["reused_batches"], again["sampling"]["reused_batches"]) == (0, 2)
    assert again["fid"] == first["fid"]
    # Another run of the same preset replaces the checkpoints: the same step, other weights.
    shutil.rmtree(workdir / "checkpoints")
    shutil.copytree(trained_tiny_run / "checkpoints" / "2", workdir / "checkpoints" / "2")
    replaced = evaluated()
    assert replaced["checkpoint"]["step"] == first["checkpoint"]["step"]
    assert replaced["sampling"]["reused_batches"] == 0
    assert replaced["sampling"]["chunk_dir"] != first["sampling"]["chunk_dir"]
    assert replaced["fid"] != first["fid"]


def test_evaluate_samples_a_conditional_run_from_its_label_prior_unless_told_otherwise(
        tmp_path, mnist_dir, network, monkeypatch, capsys):
    workdir = tmp_path / "cond"
    assert mnist.main(["--preset", "tiny", "--class-conditional", "--idx-dir", str(mnist_dir), "--workdir",
                       str(workdir), "--steps", "2", "--no-progress"]) == 0
    common = ["--workdir", str(workdir), "--idx-dir", str(mnist_dir), "--num-samples", "12", "--batch-size", "6",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    runs = {}
    for name, flags in (("default", []), ("w2", ["--guidance-scale", "2"]), ("null", ["--unconditional", "null"])):
        assert evaluate.main(common + flags) == 0
        runs[name] = json.loads((workdir / "eval.json").read_text())["sampling"]
    assert (runs["default"]["unconditional"], runs["default"]["guidance_scale"]) == ("label_prior", 1.0)
    assert runs["default"]["chunk_dir"].endswith("-prior-w1-K10-batch6")
    assert runs["w2"]["guidance_scale"] == 2.0 and "-prior-w2-" in runs["w2"]["chunk_dir"]
    assert runs["null"]["guidance_scale"] is None and runs["null"]["chunk_dir"].endswith("-null-K10-batch6")
    assert len({r["chunk_dir"] for r in runs.values()}) == 3  # no option reuses another's samples
    assert evaluate.main(common + ["--unconditional", "null", "--guidance-scale", "2"]) == 2
    assert "--guidance-scale applies to a class-conditional run" in capsys.readouterr().err


def test_evaluate_reads_mnist_through_tfds(tmp_path, tiny_run, network, monkeypatch, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    from ddpm_jax.data import tfds as tfds_source

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    # mock_data makes preparing a no-op; skip importing TensorFlow to hide GPUs (~10 s).
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)  # the stub below stands in for TF
    monkeypatch.setattr(tfds_source, "_import_tensorflow_without_gpus", lambda: None)
    with tfds.testing.mock_data(num_examples=50):
        code = evaluate.main(["--workdir", str(workdir), "--data-dir", str(tmp_path / "tfds"), "--num-samples", "20",
                              "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    report = json.loads((workdir / "eval.json").read_text())
    assert report["reference"]["num_examples"] == 50 and report["floor"]["num_samples"] == 20


@pytest.mark.parametrize(
    "flags, message",
    [(["--num-samples", "1"], "--num-samples 1"), (["--threshold", "1.5"], "--threshold 1.5"),
     (["--batch-size", "0"], "--batch-size 0"), (["--guidance-scale", "-1"], "--guidance-scale -1.0"),
     (["--guidance-scale", "nan"], "--guidance-scale nan")],
)
def test_evaluate_bad_values_get_one_line_and_exit_status_2(tmp_path, flags, message, capsys):
    assert evaluate.main(["--workdir", str(tmp_path)] + flags) == 2
    assert message in capsys.readouterr().err


def test_evaluate_without_a_checkpoint_says_how_to_train_one(tmp_path, capsys):
    assert evaluate.main(["--workdir", str(tmp_path / "nothing")]) == 2
    assert "experiments.mnist" in capsys.readouterr().err
