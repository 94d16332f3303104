"""The feature classifier's config: the network whose features FID is computed in, and its training."""

from __future__ import annotations

import ml_collections


def get_classifier_config(image_shape: tuple[int, int, int] = (28, 28, 1),
                          num_classes: int = 10) -> ml_collections.ConfigDict:
    """The classifier whose features FID is computed in (see :mod:`ddpm_jax.evaluation.feature_network`), for
    images of ``image_shape`` ``(H, W, C)`` in ``num_classes`` classes: the MNIST CNN for grey images, a
    small ResNet (``model.name='resnet'``) for RGB ones.

    Trained once per training set and cached; any change here trains (and
    caches) a new one, so FIDs are only comparable under the same config.
    """
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
    image_shape = tuple(int(d) for d in image_shape)
    if image_shape == (28, 28, 1) and num_classes == 10:
        return c  # MNIST's and Fashion-MNIST's, as before these fields existed: cached networks keep their names
    c.model.input_shape = image_shape
    c.model.num_classes = int(num_classes)
    if image_shape[-1] == 3:
        c.model.name = "resnet"
        c.model.stage_channels = (32, 64, 128)
        c.model.dropout_rate = 0.3
        c.train.num_epochs = 30
        c.train.max_shift = 4  # with the mirror: the usual CIFAR-10 augmentation (pad 4, crop, flip)
        c.train.random_flip = True
    return c

