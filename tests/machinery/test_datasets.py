"""Datasets beyond MNIST: Fashion-MNIST through the same loaders, the config's ``dataset`` field, the
``--dataset`` flag, and a run refused on another dataset than the one it was trained on."""

import json

import numpy as np
import pytest

from conftest import write_idx
from ddpm_jax import data
from ddpm_jax.configs import get_config, validate_config
from ddpm_jax.data import DATASETS, DatasetNotFoundError, dataset_info, load_dataset
from experiments import mnist


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
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; allowed: mnist, fashion_mnist"):
        dataset_info("cifar")


def test_fashion_mnist_loads_from_its_idx_files_and_names_itself_in_errors(fashion_dir, tmp_path):
    images, labels = load_dataset("fashion_mnist", "train", idx_dir=fashion_dir)
    assert images.shape == (24, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(24) % 10)
    with pytest.raises(DatasetNotFoundError, match="Fashion-MNIST IDX files for split 'test' not found"):
        load_dataset("fashion_mnist", "test", idx_dir=tmp_path)


def test_fashion_mnist_loads_through_tfds_mock_data(monkeypatch, tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_import_tensorflow_without_gpus", lambda: None)
    with tfds.testing.mock_data(num_examples=11):
        images, labels = load_dataset("fashion_mnist", "train", data_dir=tmp_path)
    assert images.shape == (11, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() <= 9


def test_the_config_accepts_known_datasets_only():
    config = get_config("tiny")
    config.dataset = "fashion_mnist"
    validate_config(config)
    config.dataset = "cifar10"
    with pytest.raises(ValueError, match="dataset='cifar10' is not allowed: mnist or fashion_mnist"):
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
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(["--dataset", "cifar", "--workdir", str(tmp_path / "w")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cifar'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
