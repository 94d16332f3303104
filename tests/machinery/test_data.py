"""Tests for ddpm_jax.data: IDX reading, MNIST loading, TFDS path and errors."""

from __future__ import annotations

import gzip
import socket
import sys
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from ddpm_jax.data import tfds as tfds_source
from ddpm_jax.data import (
    DatasetNotFoundError,
    IDXFormatError,
    load_mnist,
    load_mnist_idx,
    load_mnist_tfds,
    read_idx,
)

# Real MNIST in IDX form, kept next to the checkout (../shared in CI).
MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"

IDX_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    if not all((MNIST_DIR / f"{n}.gz").is_file() for n in IDX_NAMES):
        pytest.skip(f"real MNIST IDX files not found in {MNIST_DIR}")
    return MNIST_DIR


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None,
              compress: bool = False, extra: bytes = b"", cut: int = 0) -> Path:
    """Write ``array`` as a uint8 IDX file, optionally corrupted."""
    if magic is None:
        magic = 0x0800 | array.ndim
    blob = magic.to_bytes(4, "big")
    blob += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    blob += array.astype(np.uint8).tobytes() + extra
    if cut:
        blob = blob[:-cut]
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return path


def small_split(tmp_path: Path, n_images: int = 5, n_labels: int = 5) -> Path:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte",
              rng.integers(0, 256, (n_images, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, n_labels))
    return tmp_path


# ---------------------------------------------------------------------------
# Real IDX files
# ---------------------------------------------------------------------------


def test_real_train_split_count_comes_from_header(mnist_dir):
    images, labels = load_mnist_idx(mnist_dir, "train")
    assert images.shape == (10_000, 28, 28, 1)
    assert images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels)) == set(range(10))
    assert images.min() == 0 and images.max() == 255


def test_real_test_split_is_the_full_10000_image_test_set(mnist_dir):
    images, labels = load_mnist(split="test", idx_dir=mnist_dir)
    assert images.shape == (10_000, 28, 28, 1)
    assert images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == 9
    assert images.min() == 0 and images.max() == 255
    # The first official test labels, a cheap check that order is preserved.
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_gzip_and_raw_idx_files_read_identically(mnist_dir, tmp_path):
    for name in IDX_NAMES:
        with gzip.open(mnist_dir / f"{name}.gz", "rb") as src:
            (tmp_path / name).write_bytes(src.read())
        np.testing.assert_array_equal(
            read_idx(tmp_path / name), read_idx(mnist_dir / f"{name}.gz"))
    for split in ("train", "test"):
        raw_images, raw_labels = load_mnist_idx(tmp_path, split)
        gz_images, gz_labels = load_mnist_idx(mnist_dir, split)
        np.testing.assert_array_equal(raw_images, gz_images)
        np.testing.assert_array_equal(raw_labels, gz_labels)


def test_gzip_is_detected_by_magic_bytes_not_by_extension(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "images-without-gz-suffix", array, compress=True)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_returns_writable_native_array(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    result = read_idx(write_idx(tmp_path / "labels", array))
    assert result.flags.writeable
    assert result.dtype == np.uint8


# ---------------------------------------------------------------------------
# Malformed IDX files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_truncated_idx_file_raises_naming_the_file(tmp_path, compress):
    path = write_idx(tmp_path / "truncated-images-idx3-ubyte",
                     np.zeros((3, 28, 28)), compress=compress, cut=100)
    with pytest.raises(IDXFormatError, match="truncated") as info:
        read_idx(path)
    assert path.name in str(info.value)


def test_truncated_gzip_stream_raises_naming_the_file(tmp_path):
    path = tmp_path / "cut-download-idx3-ubyte.gz"
    write_idx(path, np.zeros((3, 28, 28)), compress=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(IDXFormatError) as info:
        read_idx(path)
    assert path.name in str(info.value)


def test_over_long_idx_file_raises_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "long-labels-idx1-ubyte", np.zeros(4), extra=b"\0")
    with pytest.raises(IDXFormatError, match="over-long") as info:
        read_idx(path)
    assert path.name in str(info.value)


def test_wrong_magic_number_raises_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "bad-magic-idx3-ubyte", np.zeros((2, 28, 28)),
                     magic=0x12340803)
    with pytest.raises(IDXFormatError, match="0x12340803") as info:
        read_idx(path)
    assert path.name in str(info.value)


def test_unsupported_dtype_code_raises_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "odd-type-idx1-ubyte", np.zeros(4), magic=0x00000701)
    with pytest.raises(IDXFormatError, match="0x07") as info:
        read_idx(path)
    assert path.name in str(info.value)


def test_labels_file_in_place_of_images_raises_naming_the_file(tmp_path):
    small_split(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(5))  # 1-D: wrong dims
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte"):
        load_mnist_idx(tmp_path, "train")


def test_image_label_count_mismatch_names_both_files_and_counts(tmp_path):
    small_split(tmp_path, n_images=5, n_labels=4)
    with pytest.raises(IDXFormatError) as info:
        load_mnist_idx(tmp_path, "train")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message
    assert "train-labels-idx1-ubyte" in message
    assert "5 images" in message and "4 labels" in message


def test_raw_files_load_into_nhwc_uint8_and_int32(tmp_path):
    images, labels = load_mnist_idx(small_split(tmp_path), "train")
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.int32


# ---------------------------------------------------------------------------
# Missing data, bad arguments
# ---------------------------------------------------------------------------


def test_missing_idx_dir_raises_naming_both_ways_out(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(split="train", idx_dir=missing)
    message = str(info.value)
    assert str(missing) in message
    assert "--idx-dir" in message and "--data-dir" in message
    assert "train-images-idx3-ubyte" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_idx_files_are_named_exactly(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist_idx(tmp_path, "test")
    message = str(info.value)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in message
    assert str(tmp_path) in message


@pytest.mark.parametrize("call", [
    lambda: load_mnist("validation", idx_dir="."),
    lambda: load_mnist_idx(".", "validation"),
    lambda: load_mnist_tfds("validation", download=False),
])
def test_unknown_split_raises_value_error_listing_splits(call):
    with pytest.raises(ValueError, match="'train', 'test'"):
        call()


# ---------------------------------------------------------------------------
# TFDS path
# ---------------------------------------------------------------------------


def test_tfds_mock_data_loads_uint8_images_and_int32_labels(
        monkeypatch, tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    # Preparing would import TensorFlow (~10 s); mock_data makes preparing a
    # no-op anyway, so record the GPU-hiding call instead of running it.
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)  # the stub below stands in for TF
    monkeypatch.setattr(tfds_source, "_import_tensorflow_without_gpus", lambda: None)
    with tfds.testing.mock_data(num_examples=37):
        for images, labels in (
            load_mnist_tfds("train", data_dir=tmp_path),
            load_mnist(split="test", data_dir=tmp_path),
        ):
            assert images.shape == (37, 28, 28, 1) and images.dtype == np.uint8
            assert labels.shape == (37,) and labels.dtype == np.int32
            assert 0 <= labels.min() and labels.max() <= 9
            assert images.max() > 0  # random pixels, not an empty buffer


def test_tfds_hides_gpus_from_tensorflow_before_preparing(monkeypatch, tmp_path,
                                                          no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    events = []
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)  # the stub below stands in for TF
    monkeypatch.setattr(tfds_source, "_import_tensorflow_without_gpus",
                        lambda: events.append("hide_gpus"))
    # mock.patch (not monkeypatch) so the patches unwind in nesting order.
    with tfds.testing.mock_data(num_examples=3), mock.patch.object(
            tfds.core.DatasetBuilder, "download_and_prepare",
            lambda self, **kw: events.append(("prepare", kw))):
        load_mnist_tfds("train", data_dir=tmp_path)
    assert events == ["hide_gpus", ("prepare", {"file_format": "array_record"})]


def test_tfds_download_false_on_empty_data_dir_fails_fast(tmp_path, no_network):
    pytest.importorskip("tensorflow_datasets")
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist_tfds("train", data_dir=tmp_path, download=False)
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert "--data-dir" in message and "--idx-dir" in message
    assert str(tmp_path) in message
    assert not any(tmp_path.iterdir())  # nothing downloaded or written


def test_tfds_failure_is_one_not_found_error_chaining_the_cause(monkeypatch,
                                                                tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cause = ConnectionError("no route to dataset host")

    def broken_builder(*args, **kwargs):
        raise cause

    monkeypatch.setattr(tfds, "builder", broken_builder)
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(split="train", data_dir=tmp_path)
    assert info.value.__cause__ is cause
    message = str(info.value)
    assert "--data-dir" in message and "--idx-dir" in message
    assert "no route to dataset host" in message


def test_data_source_is_read_in_batches():
    class Source:
        def __init__(self, n):
            self.n, self.batches = n, []

        def __len__(self):
            return self.n

        def __getitems__(self, keys):
            self.batches.append(len(keys))
            return [{"image": np.full((28, 28, 1), k % 256, np.uint8),
                     "label": np.int64(k % 10)} for k in keys]

        def __getitem__(self, key):
            raise AssertionError("per-example read used")

    source = Source(25)
    images, labels = tfds_source._read_data_source(source, (28, 28, 1), chunk=10)
    assert source.batches == [10, 10, 5]
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(25))
    np.testing.assert_array_equal(labels, np.arange(25) % 10)


@pytest.mark.parametrize("already_initialised", [False, True])
def test_tensorflow_is_imported_with_gpus_hidden(monkeypatch, already_initialised):
    # A stand-in module: the real import costs ~10-20 s and cannot show
    # anything on a machine without GPUs.
    calls = []

    def set_visible_devices(devices, device_type):
        calls.append((devices, device_type))
        if already_initialised:
            raise RuntimeError("Visible devices cannot be modified after "
                               "being initialized")

    fake_tf = types.SimpleNamespace(
        config=types.SimpleNamespace(set_visible_devices=set_visible_devices))
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    assert tfds_source._import_tensorflow_without_gpus() is fake_tf
    assert calls == [([], "GPU")]


@pytest.mark.parametrize("failure", [socket.timeout("timed out"), OSError(101, "Network is unreachable"),
                                     socket.gaierror(-3, "Temporary failure in name resolution")])
def test_an_unprepared_dataset_without_the_network_is_refused_in_seconds(tmp_path, monkeypatch, failure, capsys):
    pytest.importorskip("tensorflow_datasets")
    asked = []

    def no_connection(address, timeout=None):
        asked.append((address, timeout))
        raise failure

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)  # the network is asked only where TF could prepare
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError, match=r"preparing it needs a download from storage.googleapis.com, "
                                                   r"which is out of reach") as info:
        load_mnist_tfds("train", data_dir=tmp_path)
    assert time.perf_counter() - start < 15 and asked == [(("storage.googleapis.com", 443), 5.0)]
    assert "--idx-dir" in str(info.value) and not any(tmp_path.iterdir())
    from ddpm_jax.cli import train as mnist

    assert mnist.main(["--preset", "tiny", "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "run")]) == 2
    assert "out of reach" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_preparing_through_tfds_without_tensorflow_is_one_line_naming_the_extra(monkeypatch, tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: False)
    with mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: False), \
            pytest.raises(DatasetNotFoundError) as info:
        load_mnist_tfds("train", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'ddpm-jax[tfds]'" in message and "--idx-dir" in message and str(tmp_path) in message
