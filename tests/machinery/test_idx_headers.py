"""read_idx on arbitrary headers: it returns what the header announces, or raises IDXFormatError, never anything else."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm_jax import data as data

from ddpm_jax.data import idx as idx_source
from ddpm_jax.data import IDXFormatError, load_mnist_idx, read_idx

# Item sizes of the IDX type codes, as the format defines them (independent of the module's table).
ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
# Small payloads are written in full, so well-formed headers get exercised too.
MAX_PAYLOAD = 4096

sizes = st.one_of(
    st.integers(0, 5),
    st.integers(0, 2**32 - 1),
    st.sampled_from([2**16, 2**21, 2**22, 2**31, 2**32 - 1]),  # products that reach or wrap 2**64
)


@st.composite
def idx_blobs(draw):
    """Raw IDX bytes: a plausible or hostile header, a payload of the announced or another length, maybe cut or gzipped."""
    prefix = draw(st.one_of(st.just(b"\x00\x00"), st.binary(min_size=2, max_size=2)))
    code = draw(st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.integers(0, 255)))
    dims = draw(st.lists(sizes, min_size=0, max_size=6))
    ndim = draw(st.one_of(st.just(len(dims)), st.integers(0, 255)))  # a count that may disagree with the sizes
    header = prefix + bytes([code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    announced = math.prod(dims) * ITEMSIZE.get(code, 1)
    if announced <= MAX_PAYLOAD and draw(st.booleans()):
        payload = draw(st.binary(min_size=announced, max_size=announced))
    else:
        payload = draw(st.binary(max_size=64))
    blob = header + payload
    if draw(st.booleans()):
        blob = blob[: draw(st.integers(0, len(blob)))]
    if draw(st.booleans()):
        blob = gzip.compress(blob)
        if draw(st.booleans()):  # a cut-off download of the .gz
            blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


def parse_header(raw: bytes):
    """(dims, itemsize, payload length) of a well-formed header, decoded here without the module's code."""
    blob = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    ndim = blob[3]
    dims = tuple(int.from_bytes(blob[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return dims, ITEMSIZE[blob[2]], len(blob) - 4 - 4 * ndim


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("idx_headers")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=idx_blobs())
def test_any_header_gives_the_announced_array_or_an_idx_format_error(scratch, blob):
    path = scratch / "file-idx"
    path.write_bytes(blob)
    try:
        array = read_idx(path)
    except IDXFormatError as e:
        assert str(path) in str(e)  # every message names the file
        return
    dims, itemsize, payload = parse_header(blob)
    assert array.shape == dims
    assert array.size * itemsize == payload
    assert array.size > 0


@pytest.mark.parametrize("dims", [(2**22, 2**21, 2**21), (2**16,) * 4, (2**31, 2**31, 4)])
def test_a_header_whose_size_overflows_int64_is_refused_naming_the_file_and_the_shape(tmp_path, dims):
    # Regression: np.prod(dims, dtype=int64) wrapped these products (2**64) to 0, which matched the
    # empty payload, and reshape then failed with a bare ValueError instead of IDXFormatError.
    assert math.prod(dims) == 2**64
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims))
    with pytest.raises(IDXFormatError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and str(dims) in str(info.value)
    assert "truncated" in str(info.value)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x00\x00\x08", "at least 4 bytes"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x05", "16 header bytes"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x00", "holds no data"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x1c", "holds no data"),
        (b"\x00\x00\x08\x00", "not an IDX file"),
        (b"\x00\x00\x08\xff" + b"\x00\x00\x00\x01" * 255 + b"\x07", "255 dimensions"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "type code 0x07"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated IDX file"),
    ],
    ids=["short-magic", "short-dims", "zero-size", "zero-size-inner", "no-dims", "255-dims", "type-code",
         "short-payload"],
)
def test_each_malformed_header_raises_idx_format_error_saying_what_is_wrong(tmp_path, blob, message):
    for name, content in (("raw", blob), ("gz", gzip.compress(blob))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(IDXFormatError, match=message):
            read_idx(path)


def test_a_directory_in_place_of_the_file_is_an_idx_format_error(tmp_path):
    with pytest.raises(IDXFormatError, match="is a directory"):
        read_idx(tmp_path)


def test_a_missing_file_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nowhere")


def test_an_unreadable_file_in_the_idx_folder_is_a_dataset_not_found_error(tmp_path, monkeypatch):
    for name in data.IDX_FILES["train"]:
        (tmp_path / name).write_bytes(b"")

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(idx_source, "read_idx", refuse)
    with pytest.raises(data.DatasetNotFoundError, match="Permission denied"):
        load_mnist_idx(tmp_path, "train")


def test_a_well_formed_file_still_reads_with_its_header_shape(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "ok"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes())
    np.testing.assert_array_equal(read_idx(path), array)
