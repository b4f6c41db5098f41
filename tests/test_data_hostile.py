"""Hostile IDX datasets (issue 19, item 8): labels outside the classes, splits of different
image sizes, gzip bombs, constant and NaN images. Every file is written by the test."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from nncompress.data import DataError, mnist, read_idx, write_idx

STEMS = {
    "xtr": "train-images-idx3-ubyte",
    "ytr": "train-labels-idx1-ubyte",
    "xte": "t10k-images-idx3-ubyte",
    "yte": "t10k-labels-idx1-ubyte",
}


def _folder(tmp_path, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "xtr": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "ytr": rng.integers(0, 10, 40, dtype=np.uint8),
        "xte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "yte": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    arrays.update(override)
    folder = tmp_path / "m"
    folder.mkdir()
    for key, arr in arrays.items():
        write_idx(folder / STEMS[key], arr)
    return folder


def test_labels_outside_the_classes_are_refused(tmp_path):
    folder = _folder(tmp_path, yte=np.array([1, 2, 12, 3, 0, 0, 0, 0, 0, 0], np.uint8))
    with pytest.raises(DataError, match=r"test label 12 is outside the 10 classes \[0, 9\]"):
        mnist(folder, val_size=5)


def test_float_labels_are_refused(tmp_path):
    folder = _folder(tmp_path, ytr=np.zeros(40, np.float32))
    with pytest.raises(DataError, match="train labels are float32, must be integers"):
        mnist(folder, val_size=5)


def test_splits_of_different_image_sizes_are_refused(tmp_path):
    folder = _folder(tmp_path, xte=np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"train images are \(28, 28\) but test images \(32, 32\)"):
        mnist(folder, val_size=5)


def test_constant_images_are_refused(tmp_path):
    folder = _folder(tmp_path, xtr=np.full((40, 28, 28), 7, np.uint8))
    with pytest.raises(DataError, match=r"training images are constant \(pixel std [0-9.e-]+\)"):
        mnist(folder, val_size=5)


def test_nan_images_are_refused(tmp_path):
    x = np.random.default_rng(1).random((10, 28, 28)).astype(np.float32)
    x[3, 4, 5] = np.nan
    folder = _folder(tmp_path, xte=x)
    with pytest.raises(DataError, match="test images hold NaN or infinite values"):
        mnist(folder, val_size=5)


def test_gzip_bomb_is_inflated_only_up_to_its_header(tmp_path):
    """A gzip whose header declares 10 x 28 x 28 bytes but which inflates to 32 MiB: read up
    to the declared size (+1 byte) and refused, never inflated whole."""
    path = tmp_path / "bomb.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10, 28, 28)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    body = [comp.compress(header)]
    zeros = bytes(1 << 20)
    body += [comp.compress(zeros) for _ in range(32)]
    path.write_bytes(b"".join([*body, comp.flush()]))
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="longer than its header says"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20  # nowhere near the 32 MiB it would inflate to


def test_declared_size_beyond_max_bytes_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 100_000, 1000, 1000)  # 100 GB
    path.write_bytes(gzip.compress(header + bytes(1000)))
    with pytest.raises(DataError, match=r"declares 100000000000 elements .* max_bytes"):
        read_idx(path)
    small = tmp_path / "small"
    write_idx(small, np.zeros((4, 5), np.uint8))
    assert read_idx(small).shape == (4, 5)
    with pytest.raises(DataError, match="max_bytes=19"):
        read_idx(small, max_bytes=19)
