"""What the datasets are: their names, shapes, classes and splits, the errors the loaders raise, and the
fingerprint that says which data a run was trained on."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

SPLITS = ("train", "test")

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset the loaders read: its TFDS ``name``, the ``title`` messages use, its ``class_names``,
    the test accuracy below which the evaluation's feature classifier is said to be weak, the shape
    ``(H, W, C)`` of one image, and whether it comes as the four MNIST-format IDX files (``--idx-dir``)."""

    name: str
    title: str
    class_names: tuple[str, ...]
    good_classifier_accuracy: float
    image_shape: tuple[int, int, int] = (28, 28, 1)
    has_idx_files: bool = True
    # Where TFDS downloads it from (host, port): asked first, with a short timeout, so that a machine
    # without the network says so in seconds instead of retrying the download for minutes.
    download_host: tuple[str, int] = ("storage.googleapis.com", 443)


# The name a run trained on a folder of images (ddpm_jax.data.image_folder) has as its config's dataset.
IMAGE_FOLDER = "image_folder"

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "MNIST", tuple(str(d) for d in range(10)), 0.99),
    # Xiao, Rasul & Vollgraf 2017; the class names of its README and of TFDS.
    "fashion_mnist": DatasetInfo("fashion_mnist", "Fashion-MNIST", (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        # Small CNNs reach 90-93% on it (Xiao et al.'s benchmark); its shirts, pullovers and coats overlap.
        0.90, download_host=("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)),
    # Krizhevsky 2009; TFDS's label names. Small ResNets trained briefly reach 85-90%.
    "cifar10": DatasetInfo("cifar10", "CIFAR-10", (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        0.80, image_shape=(32, 32, 3), has_idx_files=False, download_host=("www.cs.toronto.edu", 443)),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ValueError naming the datasets there are."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)} (or --image-dir DIR, a folder "
                         "of your own images).")
    return DATASETS[name]


# Base names of the official distribution files, per split: (images, labels).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset could not be found, read or downloaded from the requested source."""


class IDXFormatError(ValueError):
    """An IDX file is malformed or does not hold what an MNIST-format dataset should hold."""


def _ways_out(title: str = "MNIST") -> str:
    # One shared text, so every "not found" error offers the same two remedies
    # whichever source failed.
    names = ", ".join(f"{n}.gz" for pair in IDX_FILES.values() for n in pair)
    return (
        f"Point the program at {title} in one of two ways:\n"
        f"  --data-dir DIR  a TensorFlow Datasets data directory where {title} is "
        "already prepared or can be prepared (preparing needs internet access "
        "the first time);\n"
        f"  --idx-dir DIR   a folder with the four standard {title} IDX files: "
        f"{names} (uncompressed copies without '.gz' work too)."
    )


def _check_split(split: str, title: str = "MNIST") -> None:
    if split not in SPLITS:
        raise ValueError(
            f"unknown {title} split {split!r}; expected one of "
            + ", ".join(repr(s) for s in SPLITS)
        )


def fingerprint(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (shape, dtype and bytes): which data a run or a cache entry was made from."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
