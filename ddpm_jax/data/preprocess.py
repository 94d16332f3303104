"""On the device: uint8 pixels to the model's [-1, 1] space and back, flips, and the one way a last batch is padded."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.data.info import IMAGE_SHAPE


def preprocess(images_u8: jnp.ndarray, image_size: int) -> jnp.ndarray:
    """uint8 ``(B, h, w, C)`` pixels -> float32 ``(B, S, S, C)`` in [-1, 1].

    Pads with the background value -1 to ``image_size`` (MNIST 28 -> 32 for the
    seed U-Net's four poolings); :func:`crop` undoes it.
    """
    chex.assert_rank(images_u8, 4)
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0
    pad_h, pad_w = image_size - x.shape[1], image_size - x.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"data.image_size={image_size} is smaller than the images ({x.shape[1]}x{x.shape[2]}).")
    if pad_h or pad_w:
        x = jnp.pad(
            x,
            ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
            constant_values=-1.0,
        )
    return x


def random_flip(key: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
    """Each image of ``x`` ``(B, H, W, C)`` mirrored left-right with probability 1/2 (Ho et al.'s CIFAR-10
    augmentation; ``data.random_flip``, off for digits, which a mirror makes into other shapes)."""
    chex.assert_rank(x, 4)
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


def pad_to_batch(array, batch: int) -> np.ndarray:
    """``array`` (rows along axis 0, at most ``batch``) grown to ``batch`` rows by repeating its rows in turn.

    One compiled shape then serves every batch, the last one too; the caller drops the extra
    rows of the result. Repeating real rows (labels, images) keeps the padding in range for
    whatever consumes it, and for batch-statistics BatchNorm alike in kind to the real rows.
    """
    array = np.asarray(array)
    if len(array) > batch:
        raise ValueError(f"pad_to_batch: {len(array)} rows do not fit a batch of {batch}.")
    return array if len(array) == batch else np.resize(array, (batch,) + array.shape[1:])


def crop(x, height: int = IMAGE_SHAPE[0], width: int = IMAGE_SHAPE[1]):
    """Centre-crop ``(..., H, W, C)`` back to ``height x width``: the inverse of :func:`preprocess`'s padding.

    Leading axes pass through, so a chain of frames ``(F, B, H, W, C)`` crops too.
    """
    top, left = (x.shape[-3] - height) // 2, (x.shape[-2] - width) // 2
    return x[..., top : top + height, left : left + width, :]
