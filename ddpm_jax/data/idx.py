"""MNIST-format IDX files (MNIST, Fashion-MNIST), gzip-compressed or raw: read with NumPy alone, offline."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from ddpm_jax.data.info import (
    IDX_FILES,
    IMAGE_SHAPE,
    NUM_CLASSES,
    DatasetNotFoundError,
    IDXFormatError,
    _check_split,
    _ways_out,
    dataset_info,
)

# IDX type codes (third byte of the magic number). Values are big-endian on
# disk, whatever the host's byte order.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"

# NumPy 1.x builds arrays of at most 32 dimensions (2.x: 64); MNIST uses 1 or 3.
_IDX_MAX_NDIM = 32


def read_idx(path) -> np.ndarray:
    """Read one IDX file, gzip-compressed or raw.

    Compression is detected from the gzip magic bytes (``1f 8b``), not from the
    file name. The header is big-endian: two zero bytes, a type code
    (``0x08`` = uint8, ...) and the number of dimensions, then one 32-bit size
    per dimension. MNIST images are ``0x00000803`` ``(N, rows, cols)``, labels
    ``0x00000801`` ``(N,)``; the count ``N`` is taken from the header.

    Parameters
    ----------
    path : str or os.PathLike
        The IDX file.

    Returns
    -------
    numpy.ndarray
        Array of the shape given in the header, e.g. ``(N, 28, 28)`` uint8 for
        images or ``(N,)`` uint8 for labels, in native byte order (a writable
        copy, not a view of the file buffer).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    IDXFormatError
        On a directory in place of the file, a corrupt gzip stream, a wrong
        magic number, an unsupported type code, more than 32 dimensions, a
        truncated header, a dimension of size 0, or a payload whose length does
        not match the header (truncated or over-long file, including headers
        whose sizes multiply past what any file could hold). The message names
        the file, what was expected and what was found.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError as e:
        # Not a missing file but a wrong one: a format error, so callers that
        # turn bad data into one line need not know about directories.
        raise IDXFormatError(
            f"{path}: is a directory, not an IDX file; give the path of the "
            "file itself (e.g. train-images-idx3-ubyte.gz)"
        ) from e
    if raw[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            # A cut-off download is the usual cause; say so with the path.
            raise IDXFormatError(
                f"{path}: corrupt or truncated gzip stream ({e})"
            ) from e
    else:
        data = raw

    if len(data) < 4:
        raise IDXFormatError(
            f"{path}: truncated IDX header: expected at least 4 bytes of magic "
            f"number, found {len(data)} bytes"
        )
    zero, code, ndim = data[0:2], data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    if zero != b"\x00\x00" or ndim == 0:
        raise IDXFormatError(
            f"{path}: not an IDX file: expected a magic number 0x0000TTDD "
            "(e.g. 0x00000803 for images, 0x00000801 for labels), "
            f"found 0x{magic:08x}"
        )
    if code not in _IDX_DTYPES:
        supported = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise IDXFormatError(
            f"{path}: unsupported IDX type code 0x{code:02x} in magic number "
            f"0x{magic:08x}; expected one of {supported}"
        )
    if ndim > _IDX_MAX_NDIM:
        # The byte allows 255, but NumPy cannot build such an array; a count
        # this large means a corrupt header, not a real tensor.
        raise IDXFormatError(
            f"{path}: magic number 0x{magic:08x} announces {ndim} dimensions; "
            f"at most {_IDX_MAX_NDIM} are supported (MNIST files have 1 or 3)"
        )
    dtype = _IDX_DTYPES[code]

    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(
            f"{path}: truncated IDX header: magic 0x{magic:08x} announces "
            f"{ndim} dimensions, so expected {header_len} header bytes, "
            f"found {len(data)}"
        )
    dims = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    if 0 in dims:
        raise IDXFormatError(
            f"{path}: IDX header announces shape {dims}, which holds no data; "
            "every dimension must be at least 1 (a damaged header or an empty "
            "export)"
        )
    # Python ints, not np.prod: three sizes of 2**32 overflow int64 and could
    # wrap to a product that matches the payload length.
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        kind = "truncated" if found < expected else "over-long"
        raise IDXFormatError(
            f"{path}: {kind} IDX file: header announces shape {dims} of "
            f"{dtype.newbyteorder('=').name}, i.e. {expected} payload bytes, "
            f"found {found}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    # astype copies: the result is native-endian and owns writable memory.
    return array.astype(dtype.newbyteorder("="))


def _find_idx_file(idx_dir: Path, base: str) -> Path | None:
    # Prefer the .gz original when both exist: it is what the official
    # distribution ships, and a raw sibling may be a half-finished extraction.
    for name in (base + ".gz", base):
        candidate = idx_dir / name
        if candidate.is_file():
            return candidate
    return None


def _read_idx_file(path: Path) -> np.ndarray:
    # A file that exists but cannot be opened (no read permission, removed
    # between the lookup and the read) is a dataset that cannot be read:
    # callers already turn DatasetNotFoundError into one line.
    try:
        return read_idx(path)
    except OSError as e:
        raise DatasetNotFoundError(
            f"{path}: cannot read the MNIST IDX file ({e.strerror or e}); "
            "check that it exists and is readable, or point --idx-dir at "
            "another copy"
        ) from e


def load_mnist_idx(idx_dir, split: str, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST (or Fashion-MNIST: ``dataset``) from the standard IDX files in a folder.

    Split ``'train'`` reads ``train-images-idx3-ubyte[.gz]`` and
    ``train-labels-idx1-ubyte[.gz]``; ``'test'`` reads
    ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``.
    Either the gzip or the raw name is accepted (the ``.gz`` one wins if both
    exist). The number of examples comes from the file headers, so a subset
    (say 10,000 training images) loads as such.

    Parameters
    ----------
    idx_dir : str or os.PathLike
        Folder holding the IDX files.
    split : {'train', 'test'}
        Which split to load.

    Returns
    -------
    images : numpy.ndarray
        ``uint8``, shape ``(N, 28, 28, 1)``, values 0..255.
    labels : numpy.ndarray
        ``int32``, shape ``(N,)``, values 0..9.

    Raises
    ------
    ValueError
        If ``split`` is not ``'train'`` or ``'test'``.
    DatasetNotFoundError
        If the folder or either file is missing or cannot be read; the message
        names the folder and the exact file names looked for.
    IDXFormatError
        If a file is malformed, does not hold 28x28 uint8 images / uint8
        labels in 0..9, or the two files hold different numbers of examples
        (the message names both files and both counts).
    """
    title = dataset_info(dataset).title
    _check_split(split, title)
    idx_dir = Path(idx_dir)
    bases = IDX_FILES[split]
    if not idx_dir.is_dir():
        looked_for = ", ".join(f"{b}[.gz]" for b in bases)
        raise DatasetNotFoundError(
            f"{title} IDX folder {idx_dir} does not exist (looked for "
            f"{looked_for} there for split {split!r}).\n{_ways_out(title)}"
        )
    paths = [_find_idx_file(idx_dir, b) for b in bases]
    missing = [b for b, p in zip(bases, paths) if p is None]
    if missing:
        looked_for = " and ".join(f"{b}.gz or {b}" for b in missing)
        raise DatasetNotFoundError(
            f"{title} IDX files for split {split!r} not found in {idx_dir}: "
            f"looked for {looked_for}.\n{_ways_out(title)}"
        )
    image_path, label_path = paths

    images = _read_idx_file(image_path)
    if (images.dtype != np.uint8 or images.ndim != 3
            or images.shape[1:] != IMAGE_SHAPE):
        raise IDXFormatError(
            f"{image_path}: expected uint8 images of shape (N, 28, 28) "
            f"(magic 0x00000803), found {images.dtype} of shape {images.shape}"
        )
    labels = _read_idx_file(label_path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(
            f"{label_path}: expected uint8 labels of shape (N,) "
            f"(magic 0x00000801), found {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise IDXFormatError(
            f"{title} split {split!r}: {image_path} holds {len(images)} images "
            f"but {label_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise IDXFormatError(
            f"{label_path}: expected labels in 0..{NUM_CLASSES - 1}, "
            f"found {int(labels.max())}"
        )
    return images[..., np.newaxis], labels.astype(np.int32)
