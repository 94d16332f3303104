"""A folder of your own images as training data: ``load_image_folder(directory, image_size)``.

What ``--image-dir DIR`` reads. The folder is searched recursively for PNG and JPEG
files (``.png``, ``.jpg``, ``.jpeg``, any case; other files are skipped). Each image is
center-cropped to a square and resized to ``image_size`` (bicubic), so images of
mixed sizes and shapes are fine. The images are grey (one channel) if every one of
them is grey (a grey mode, or RGB with equal channels everywhere), RGB otherwise.

Labels come from the layout:

* every image directly in ``DIR`` (or below one subfolder only): unlabelled, for an
  unconditional model;
* every image in one of two or more subfolders of ``DIR`` (at any depth below it):
  the subfolder's name is the image's class, classes numbered in sorted name order,
  for class-conditional training and evaluation.

Anything else is refused with one line naming the problem (:class:`ImageFolderError`):
a missing or empty folder, a file that cannot be read as an image, an image of more than
:data:`MAX_PIXELS` pixels, images both directly in ``DIR`` and in class subfolders. Linked
folders are followed (each real folder once); files that are not regular files are skipped.

Returns the same ``uint8`` NHWC arrays the dataset loaders of :mod:`ddpm_jax.data.datasets` do.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ddpm_jax.utils.progress import progress_bar

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "ImageFolderError", "find_images", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The largest image read (width x height): 64 megapixels, 8000 x 8000, below PIL's own decompression-bomb
# guard (about 179 megapixels), so a huge file is refused by name before it is decoded into memory.
MAX_PIXELS = 64 * 10**6
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class ImageFolderError(ValueError):
    """The folder does not hold images this can train on; the message is one line naming why."""


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """A folder's images: ``images`` uint8 ``(N, S, S, C)`` (C = 1 grey or 3 RGB), ``labels`` int32 ``(N,)``
    or None (no class subfolders), ``class_names`` (the subfolders, sorted; empty when unlabelled) and the
    ``files`` read, in the order of the images."""

    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    files: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def find_images(directory: str | os.PathLike) -> list[Path]:
    """The PNG and JPEG files under ``directory``, recursively, in sorted path order.

    Hidden files and folders are skipped, and so is anything with an image's name that is not a regular
    file (a FIFO, socket or device would block or fail the reader), before anything is read. Linked folders
    are followed (a class folder may be a link), each real folder once, so a link back up the tree ends
    there instead of looping.
    """
    root = Path(directory)
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # reached again through a link: a loop, or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES) and (Path(dirpath) / f).is_file()]
    return found


def _labels_from_layout(root: Path, files: list[Path]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    tops = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None for f in files]
    at_root = sum(t is None for t in tops)
    class_names = tuple(sorted({t for t in tops if t is not None}))
    if at_root and class_names:
        raise ImageFolderError(
            f"{root}: {at_root} images lie directly in the folder and {len(files) - at_root} in subfolders "
            f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}), so the labels do not match "
            "the images; put every image in a class subfolder (its name is the label), or none in any.")
    if len(class_names) < 2:
        return None, ()
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[t] for t in tops], dtype=np.int32), class_names


def _read(path: Path, image_size: int) -> np.ndarray:
    """One image, center-cropped to a square and resized: uint8 ``(S, S, 3)``, and whether it was grey."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:  # judged from the header, before decoding
                raise ImageFolderError(
                    f"{path}: {width}x{height} pixels is over the {MAX_PIXELS:,} an --image-dir image may have; "
                    "downscale it first (training resizes every image to data.image_size anyway).")
            image.load()  # decode now: a truncated file fails here, not later
            grey = image.mode in _GREY_MODES
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float greys: scale to 8 bits
                values = np.asarray(image, dtype=np.float64)
                top = 65535.0 if values.max() > 255 else 255.0
                image = Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8))
            rgb = image.convert("RGB")
    except ImageFolderError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ImageFolderError(f"{path}: cannot be read as an image ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no detail'}).") from None
    if min(rgb.size) < 1:
        raise ImageFolderError(f"{path}: an image of {rgb.size[0]}x{rgb.size[1]} pixels cannot be resized.")
    square = ImageOps.fit(rgb, (image_size, image_size), method=Image.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(square, dtype=np.uint8), grey


def load_image_folder(directory: str | os.PathLike, image_size: int, *, progress: bool = False) -> ImageFolder:
    """Read every image under ``directory`` as training data (see the module docstring).

    Args:
      directory: the folder, searched recursively.
      image_size: height and width every image is center-cropped and resized to.
      progress: a progress bar while reading.

    Raises:
      ImageFolderError: the folder is missing or holds no images, a file cannot be read, or the
        layout gives images with and without labels.
    """
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size={image_size!r}: expected a size in pixels >= 1.")
    root = Path(directory)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: no such folder (--image-dir takes a folder of PNG or JPEG images).")
    files = find_images(root)
    if not files:
        raise ImageFolderError(f"{root}: holds no PNG or JPEG images (searched recursively for "
                               f"{', '.join(IMAGE_SUFFIXES)}).")
    labels, class_names = _labels_from_layout(root, files)
    images = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    all_grey = True
    for i, path in enumerate(progress_bar(files, unit="image", desc=f"reading {root}",
                                          enabled=progress and len(files) > 1000)):
        images[i], grey = _read(path, image_size)
        # An RGB file whose channels are all equal is grey too (a scan saved as RGB).
        all_grey = all_grey and (grey or bool((images[i] == images[i, ..., :1]).all()))
    if all_grey:
        images = images[..., :1].copy()
    return ImageFolder(images, labels, class_names, tuple(str(f) for f in files))
