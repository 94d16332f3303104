"""The feature classifiers' configs: the networks whose features FID and KID are computed in, and their training.

Every dataset is measured in two feature spaces, each a classifier of its own architecture and
training recipe, so that a sample-quality figure can be checked in a space it was not chosen in:

- ``'cnn'``: four 3x3 convolutions in two max-pooled stages, no normalization, a dense feature
  layer, dropout 0.5, random translations of up to 2 pixels, Adam, seed 0.
- ``'resnet'``: a pre-activation ResNet with GroupNorm, global average pooling, dropout 0.1,
  translations of up to 1 pixel and cutout, another learning rate and weight decay, seed 1.

The first space of :data:`FEATURE_SPACES` that suits the images is their primary one
(:func:`primary_space`): the CNN for grey images, the ResNet for RGB ones; the figures (class
histogram, least confident samples) use it. For MNIST and Fashion-MNIST the trained networks ship
with the package (:mod:`ddpm_jax.evaluation.shipped`), made from :func:`feature_network_config`.
"""

from __future__ import annotations

import ml_collections

FEATURE_SPACES = ("cnn", "resnet")


def primary_space(image_shape: tuple[int, int, int]) -> str:
    """The feature space a dataset's figures use: ``'cnn'`` for grey images, ``'resnet'`` for RGB ones."""
    return "resnet" if int(image_shape[-1]) == 3 else "cnn"


def get_classifier_config(image_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10,
                          space: str | None = None) -> ml_collections.ConfigDict:
    """The classifier of feature space ``space`` (default: the images' :func:`primary_space`) for images of
    ``image_shape`` ``(H, W, C)`` in ``num_classes`` classes.

    A network is trained once per (config, training set) and kept: any change here makes a
    new one, so FIDs are only comparable under the same config.
    """
    image_shape = tuple(int(d) for d in image_shape)
    space = primary_space(image_shape) if space is None else space
    if space not in FEATURE_SPACES:
        raise ValueError(f"feature space {space!r}: must be one of {', '.join(FEATURE_SPACES)}.")
    rgb = image_shape[-1] == 3
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.stage_channels = (32, 64)
    c.model.feature_dim = 128  # the FID feature space
    c.model.dropout_rate = 0.5
    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 15
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3  # Adam, cosine decay to 0 after a short warm-up
    c.train.warmup_steps = 100
    c.train.weight_decay = 1e-4
    c.train.max_shift = 2  # augmentation: random translations of up to this many pixels
    c.train.seed = 0
    if space == "resnet" and not rgb:
        c.model.name = "resnet"
        c.model.stage_channels = (16, 32, 64)
        c.model.dropout_rate = 0.1
        c.train.num_epochs = 20
        c.train.learning_rate = 1e-3
        c.train.weight_decay = 5e-4
        c.train.max_shift = 1
        c.train.cutout = 6  # augmentation: a 6x6 square of each image set to the background
        c.train.seed = 1
    if image_shape == (28, 28, 1) and num_classes == 10:
        return c  # MNIST's and Fashion-MNIST's: no input fields, as before they existed
    c.model.input_shape = image_shape
    c.model.num_classes = int(num_classes)
    if rgb:
        c.train.num_epochs = 30
        c.train.max_shift = 4  # with the mirror: the usual CIFAR-10 augmentation (pad 4, crop, flip)
        c.train.random_flip = True
        if space == "resnet":
            c.model.name = "resnet"
            c.model.stage_channels = (32, 64, 128)
            c.model.dropout_rate = 0.3
        else:
            c.train.learning_rate = 1e-3
            c.train.seed = 1
    return c


# How long each shipped network trains, by dataset: Fashion-MNIST's 60,000 images take fewer epochs for about
# as many steps as MNIST's 10,000.
_EPOCHS = {("fashion_mnist", "cnn"): 3, ("fashion_mnist", "resnet"): 4}


def feature_network_config(dataset: str, space: str, image_shape: tuple[int, int, int] = (28, 28, 1),
                           num_classes: int = 10) -> ml_collections.ConfigDict:
    """The config a dataset's feature network of ``space`` is trained with: the one that ships for MNIST
    and Fashion-MNIST (``experiments.feature_networks``), and the one ``--retrain-features`` retrains."""
    c = get_classifier_config(image_shape, num_classes, space)
    if (dataset, space) in _EPOCHS:
        c.train.num_epochs = _EPOCHS[dataset, space]
    return c
