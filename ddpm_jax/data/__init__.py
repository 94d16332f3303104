"""Training data: the datasets (MNIST, Fashion-MNIST, CIFAR-10 from TFDS or IDX files), a folder of your own
images, and the preprocessing every network sees. The public names of its modules are re-exported here."""

from __future__ import annotations

from ddpm_jax.data.datasets import (  # noqa: F401
    load_dataset,
    load_mnist,
)
from ddpm_jax.data.idx import (  # noqa: F401
    load_mnist_idx,
    read_idx,
)
from ddpm_jax.data.info import (  # noqa: F401
    DATASETS,
    IDX_FILES,
    IMAGE_FOLDER,
    IMAGE_SHAPE,
    NUM_CLASSES,
    SPLITS,
    DatasetInfo,
    DatasetNotFoundError,
    IDXFormatError,
    dataset_info,
    fingerprint,
)
from ddpm_jax.data.preprocess import (  # noqa: F401
    crop,
    pad_to_batch,
    preprocess,
    random_flip,
)
from ddpm_jax.data.tfds import (  # noqa: F401
    DOWNLOAD_PROBE_SECONDS,
    TFDS_EXTRA,
    load_mnist_tfds,
)

__all__ = [
    'DATASETS', 'DOWNLOAD_PROBE_SECONDS', 'DatasetInfo', 'DatasetNotFoundError', 'IDXFormatError', 'IDX_FILES',
    'IMAGE_FOLDER', 'IMAGE_SHAPE', 'NUM_CLASSES', 'SPLITS', 'TFDS_EXTRA', 'crop', 'dataset_info', 'fingerprint',
    'load_dataset', 'load_mnist', 'load_mnist_idx', 'load_mnist_tfds', 'pad_to_batch', 'preprocess', 'random_flip',
    'read_idx',
]
