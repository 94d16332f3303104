"""The datasets as host NumPy arrays, from IDX files or TensorFlow Datasets.

The datasets (:data:`DATASETS`, by their TFDS names): MNIST and Fashion-MNIST
(28x28 grey, 10 classes, the same four IDX file names) and CIFAR-10 (32x32 RGB,
10 classes, through TFDS only). MNIST is the default everywhere. A folder of
the user's own images is read by :mod:`ddpm_jax.data.image_folder`.

Every loader returns the same pair:

* ``images``: ``uint8`` array of shape ``(N, H, W, C)`` (the dataset's
  :attr:`DatasetInfo.image_shape`: ``(N, 28, 28, 1)`` for MNIST, ``(N, 32, 32, 3)``
  for CIFAR-10), pixel values 0..255, NHWC layout;
* ``labels``: ``int32`` array of shape ``(N,)``, classes 0..9.

The loaders do not rescale the pixels: the mapping to ``[-1, 1]`` that the
diffusion model works in (:func:`preprocess`, and :func:`crop` back) runs later,
inside the jitted step on the device, so the host keeps the compact ``uint8``
form (a quarter of the bytes of ``float32``) and transfers it as such.

Two sources are supported:

* :func:`~ddpm_jax.data.idx.load_mnist_idx` reads the four standard MNIST IDX files (gzip or raw)
  from a folder; it needs nothing beyond NumPy and works offline.
* :func:`~ddpm_jax.data.tfds.load_mnist_tfds` goes through ``tensorflow-datasets``; it reads an
  ``array_record`` dataset by random access (``builder.as_data_source``, what
  ``tfds.data_source`` uses; Pillow decodes the PNGs, no TensorFlow), and only
  imports TensorFlow when it has to prepare the dataset or read one stored as
  ``tfrecord``.

:func:`load_mnist` picks between them. The two sources hold the same examples
but not in the same order: TFDS shuffles examples when it prepares a dataset
(deterministically), while the IDX files keep the official order.
"""

from __future__ import annotations

import numpy as np

from ddpm_jax.data.idx import load_mnist_idx
from ddpm_jax.data.info import DatasetNotFoundError, _check_split, dataset_info
from ddpm_jax.data.tfds import load_mnist_tfds


def load_dataset(
    dataset: str = "mnist",
    split: str = "train",
    *,
    data_dir=None,
    idx_dir=None,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of ``dataset`` (a key of :data:`DATASETS`) from IDX files or through TensorFlow Datasets.

    Parameters
    ----------
    split : {'train', 'test'}
        Which split to load.
    dataset : str
        ``'mnist'``, ``'fashion_mnist'`` or ``'cifar10'`` (:data:`DATASETS`).
    data_dir : str or os.PathLike, optional
        TFDS data directory (used when ``idx_dir`` is not given).
    idx_dir : str or os.PathLike, optional
        Folder with the standard MNIST-format IDX files (MNIST, Fashion-MNIST); takes precedence over TFDS.
    download : bool
        TFDS only: whether MNIST may be downloaded and prepared.

    Returns
    -------
    images : numpy.ndarray
        ``uint8``, shape ``(N, *DatasetInfo.image_shape)`` (MNIST ``(N, 28, 28, 1)``), values 0..255.
    labels : numpy.ndarray
        ``int32``, shape ``(N,)``, values 0..9.

    Raises
    ------
    ValueError
        If ``split`` is not ``'train'`` or ``'test'``.
    DatasetNotFoundError, IDXFormatError
        See :func:`load_mnist_idx` and :func:`load_mnist_tfds`.
    """
    info = dataset_info(dataset)
    _check_split(split, info.title)
    if idx_dir is not None:
        if not info.has_idx_files:
            raise DatasetNotFoundError(f"{info.title} does not come as IDX files, so --idx-dir cannot read it; "
                                       f"load it through TensorFlow Datasets (--data-dir DIR) instead.")
        return load_mnist_idx(idx_dir, split, dataset)
    return load_mnist_tfds(split, data_dir=data_dir, download=download, dataset=dataset)


def load_mnist(split: str = "train", *, data_dir=None, idx_dir=None, download: bool = True):
    """:func:`load_dataset` of MNIST."""
    return load_dataset("mnist", split, data_dir=data_dir, idx_dir=idx_dir, download=download)
