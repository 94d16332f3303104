"""Datasets beyond MNIST: Fashion-MNIST through the same loaders, CIFAR-10 (RGB, 32x32) through TFDS, the
config's ``dataset`` field, the ``--dataset`` flag, and a run refused on another dataset than the one it was
trained on."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import ddpm_jax
import ml_collections
from conftest import write_idx
from ddpm_jax import data as data
from ddpm_jax.data import tfds as tfds_source
from ddpm_jax.evaluation import plotting
from ddpm_jax.configs import get_classifier_config, get_config, validate_config
from ddpm_jax.evaluation.feature_network import FeatureNetwork, train_classifier
from ddpm_jax.data import DATASETS, DatasetNotFoundError, dataset_info, load_dataset
from ddpm_jax.cli import train as mnist


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Fashion-MNIST's four IDX files (the same names as MNIST's), 24 training and 8 test images."""
    d = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(7)
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (24, 28, 28)))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(24) % 10)
    write_idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(8) % 10)
    return d


def test_every_dataset_has_ten_named_classes_and_unknown_names_list_the_known_ones():
    for name, info in DATASETS.items():
        assert info.name == name and len(info.class_names) == 10 and 0 < info.good_classifier_accuracy < 1
    assert dataset_info("fashion_mnist").class_names[9] == "Ankle boot"
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; allowed: mnist, fashion_mnist, cifar10"):
        dataset_info("cifar")
    assert dataset_info("cifar10").image_shape == (32, 32, 3) and not dataset_info("cifar10").has_idx_files


def test_fashion_mnist_loads_from_its_idx_files_and_names_itself_in_errors(fashion_dir, tmp_path):
    images, labels = load_dataset("fashion_mnist", "train", idx_dir=fashion_dir)
    assert images.shape == (24, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(24) % 10)
    with pytest.raises(DatasetNotFoundError, match="Fashion-MNIST IDX files for split 'test' not found"):
        load_dataset("fashion_mnist", "test", idx_dir=tmp_path)


def test_fashion_mnist_loads_through_tfds_mock_data(monkeypatch, tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)  # the stub below stands in for TF
    monkeypatch.setattr(tfds_source, "_import_tensorflow_without_gpus", lambda: None)
    with tfds.testing.mock_data(num_examples=11):
        images, labels = load_dataset("fashion_mnist", "train", data_dir=tmp_path)
    assert images.shape == (11, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() <= 9


def test_the_config_accepts_known_datasets_only():
    config = get_config("tiny")
    config.dataset = "fashion_mnist"
    validate_config(config)
    config.dataset = "cifar10"
    validate_config(config)
    config.dataset = "svhn"
    with pytest.raises(ValueError, match="dataset='svhn' is not allowed: mnist or fashion_mnist or cifar10 or "
                                         "image_folder"):
        validate_config(config)


def test_training_on_fashion_mnist_records_it_and_a_resume_on_mnist_is_refused(fashion_dir, idx_dir, tmp_path,
                                                                                capsys):
    workdir = tmp_path / "run"
    common = ["--preset", "tiny", "--workdir", str(workdir), "--no-progress"]
    assert mnist.main(common + ["--steps", "2", "--dataset", "fashion_mnist", "--idx-dir", str(fashion_dir)]) == 0
    assert json.loads((workdir / "config.json").read_text())["dataset"] == "fashion_mnist"
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    capsys.readouterr()
    assert mnist.main(common + ["--steps", "4", "--idx-dir", str(idx_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "dataset" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_an_unknown_dataset_flag_is_one_line_and_status_2(tmp_path, capsys):
    assert mnist.main(["--dataset", "cifar", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'cifar'; allowed: mnist, fashion_mnist, cifar10") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_cifar10_has_no_idx_files_and_says_to_use_tfds(tmp_path, capsys):
    assert mnist.main(["--dataset", "cifar10", "--idx-dir", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 does not come as IDX files" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


@pytest.fixture
def cifar10_mock(monkeypatch, no_network):
    """TFDS's CIFAR-10 replaced by random examples of its shapes (32x32x3 uint8, 10 labels), offline."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)  # the stub below stands in for TF
    monkeypatch.setattr(tfds_source, "_import_tensorflow_without_gpus", lambda: None)
    with tfds.testing.mock_data(num_examples=16):
        yield


def test_cifar10_loads_through_tfds_as_rgb_32x32(cifar10_mock, tmp_path):
    images, labels = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() <= 9


def test_cifar10_trains_under_mock_data_and_its_checkpoint_samples_rgb(cifar10_mock, tmp_path):
    workdir = tmp_path / "run"
    # The tiny network on CIFAR-10's data: 32x32 RGB, flipped, the figures drawn in colour.
    assert mnist.main(["--preset", "tiny", "--dataset", "cifar10", "--data-dir", str(tmp_path / "tfds"),
                       "--set", "data.random_flip=True", "--workdir", str(workdir), "--no-progress"]) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert (config["dataset"], config["data"]["channels"], config["data"]["native_size"],
            config["data"]["image_size"]) == ("cifar10", 3, 32, 32)
    checkpoint = ddpm_jax.load_checkpoint(str(workdir))
    images = ddpm_jax.sample(checkpoint, jax.random.PRNGKey(0), 3)
    assert images.shape == (3, 32, 32, 3) and np.isfinite(np.asarray(images)).all()
    with Image.open(workdir / "samples.png") as grid:
        assert grid.mode == "RGB"


def test_random_flip_mirrors_about_half_the_images_left_right_and_leaves_the_rest():
    x = jax.random.normal(jax.random.PRNGKey(0), (200, 4, 5, 3))
    out = np.asarray(data.random_flip(jax.random.PRNGKey(1), x))
    x = np.asarray(x)
    flipped = np.array([np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)])
    kept = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ kept).all() and 70 < flipped.sum() < 130


def test_grey_and_rgb_grids_tile_alike_and_rgb_stays_in_colour(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.uniform(-1, 1, (6, 5, 5, 1)).astype(np.float32)
    tiles = plotting.tile(plotting.to_uint8(np.repeat(grey, 3, axis=-1)), nrow=3)
    assert tiles.shape == (2 * 7 + 2, 3 * 7 + 2, 3)
    np.testing.assert_array_equal(tiles[..., 0], plotting.tile(plotting.to_uint8(grey), nrow=3))
    plotting.save_grid(rng.uniform(-1, 1, (4, 8, 8, 3)), str(tmp_path / "rgb.png"), nrow=2)
    with Image.open(tmp_path / "rgb.png") as image:
        assert image.mode == "RGB"
    with pytest.raises(ValueError, match="grey .C=1. or RGB .C=3."):
        plotting.tile(np.zeros((2, 4, 4, 2), np.uint8), nrow=2)


def test_the_rgb_feature_classifier_is_a_resnet_that_learns_colours_and_shapes():
    rng = np.random.default_rng(0)
    labels = np.arange(240) % 3
    images = rng.integers(0, 40, (240, 32, 32, 3)).astype(np.uint8)
    for i, y in enumerate(labels):  # class 0: a red square, 1: a green bar, 2: a blue square in a corner
        if y == 0:
            images[i, 8:24, 8:24, 0] = 220
        elif y == 1:
            images[i, :, 14:18, 1] = 220
        else:
            images[i, 2:12, 2:12, 2] = 220
    config = get_classifier_config((32, 32, 3), num_classes=3)
    assert config.model.name == "resnet" and config.train.random_flip
    config.train.num_epochs, config.train.batch_size = 6, 40
    params, _ = train_classifier(images[:180], labels[:180], config)
    network = FeatureNetwork(params, ml_collections.FrozenConfigDict(config.to_dict()), 0.0, {})
    probs, features = network(images[180:])
    assert probs.shape == (60, 3) and features.shape == (60, config.model.feature_dim)
    assert network.accuracy(images[180:], labels[180:]) > 0.9
    # Grey 28x28 in 10 classes keeps MNIST's network and config (and so its cached networks' names).
    assert get_classifier_config((28, 28, 1), 10).to_dict() == get_classifier_config().to_dict()
    assert "input_shape" not in get_classifier_config().model
