"""IDX reader, dataset loaders, held-out split and normalisation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from nncompress.data import (
    DataError,
    digits,
    fashion_mnist,
    load_dataset,
    mnist,
    read_idx,
    synthetic,
    write_idx,
)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 7], dtype=np.int8),
        np.arange(-6, 6, dtype=np.int16).reshape(3, 4),
        np.arange(10, dtype=np.int32) * 100_000,
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6),
        np.linspace(-1, 1, 5, dtype=np.float64),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, array, compress):
    path = tmp_path / "a.idx"
    write_idx(path, array, compress=compress)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.shape == array.shape
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_idx_reads_hand_written_header(tmp_path):
    # magic 0x00000803 (uint8, 3 dims), dims 2x2x2, then 8 bytes of data
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 2, 2) + bytes(range(8))
    (tmp_path / "x").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), np.arange(8).reshape(2, 2, 2))
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), np.arange(8).reshape(2, 2, 2))


def _valid(tmp_path):
    path = tmp_path / "v.idx"
    write_idx(path, np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    return path, path.read_bytes()


def test_idx_truncated_data(tmp_path):
    path, raw = _valid(tmp_path)
    path.write_bytes(raw[:-7])
    with pytest.raises(DataError, match=r"v\.idx.*truncated"):
        read_idx(path)


def test_idx_truncated_header(tmp_path):
    path, raw = _valid(tmp_path)
    path.write_bytes(raw[:9])
    with pytest.raises(DataError, match="truncated inside its header"):
        read_idx(path)
    path.write_bytes(raw[:3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_idx_trailing_bytes(tmp_path):
    path, raw = _valid(tmp_path)
    path.write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="longer than its header"):
        read_idx(path)


def test_idx_truncated_gzip(tmp_path):
    path, raw = _valid(tmp_path)
    gz = gzip.compress(raw)
    path.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x03", b"\x00\x00\x07\x03", b"PK\x03\x04"])
def test_idx_wrong_magic(tmp_path, magic):
    path, raw = _valid(tmp_path)
    path.write_bytes(magic + raw[4:])
    with pytest.raises(DataError, match="wrong magic"):
        read_idx(path)


def test_idx_bad_number_of_dimensions(tmp_path):
    path = tmp_path / "d.idx"
    path.write_bytes(bytes([0, 0, 8, 0]))
    with pytest.raises(DataError, match="0 dimensions"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 200]) + b"\x00" * 800)
    with pytest.raises(DataError, match="200 dimensions"):
        read_idx(path)


@pytest.mark.parametrize(
    "dims",
    [
        (0xFFFFFFFF, 0xFFFFFFFF),
        # 2^64 elements: a product in int64 would wrap round to 0 and look like an empty file
        (65536, 65536, 65536, 65536),
    ],
)
def test_idx_absurd_dimensions_refused_without_allocating(tmp_path, dims):
    path = tmp_path / "huge.idx"
    path.write_bytes(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims))
    with pytest.raises(DataError, match="elements"):
        read_idx(path)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.idx"):
        read_idx(tmp_path / "nope.idx")


def test_write_idx_refuses_unsupported_dtype(tmp_path):
    with pytest.raises(DataError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.complex64))


def _write_mnist_folder(folder, n_train=40, n_test=10, compress=False, seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    xtr = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    ytr = rng.integers(0, 10, size=n_train, dtype=np.uint8)
    xte = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    yte = rng.integers(0, 10, size=n_test, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in [
        ("train-images-idx3-ubyte", xtr),
        ("train-labels-idx1-ubyte", ytr),
        ("t10k-images-idx3-ubyte", xte),
        ("t10k-labels-idx1-ubyte", yte),
    ]:
        write_idx(folder / (stem + suffix), arr, compress=compress)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_tiny_folder(tmp_path, compress):
    xtr, ytr, xte, yte = _write_mnist_folder(tmp_path / "m", compress=compress)
    splits = mnist(tmp_path / "m", val_size=8, seed=3)
    assert splits.input_shape == (1, 28, 28)
    assert len(splits.train[1]) == 32 and len(splits.val[1]) == 8 and len(splits.test[1]) == 10
    # statistics come from the 32 training images only (pixels scaled to [0, 1])
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    train_px = torch.from_numpy(xtr[perm[8:].numpy()].astype(np.float32) / 255)
    assert splits.mean == pytest.approx(float(train_px.mean()), rel=1e-6)
    assert splits.std == pytest.approx(float(train_px.std()), rel=1e-6)
    # test split is untouched apart from normalisation, in file order
    expect_test = (torch.from_numpy(xte.astype(np.float32) / 255) - splits.mean) / splits.std
    torch.testing.assert_close(splits.test[0][:, 0], expect_test)
    np.testing.assert_array_equal(splits.test[1].numpy(), yte)
    assert splits.train[1].dtype == torch.int64
    # train + val together are exactly the training file
    merged = torch.cat([splits.train[1], splits.val[1]]).sort().values.numpy()
    np.testing.assert_array_equal(merged, np.sort(ytr))


def test_mnist_without_folder_explains(monkeypatch):
    monkeypatch.delenv("NNCOMPRESS_MNIST", raising=False)
    with pytest.raises(DataError, match="--data-dir"):
        mnist(None)


def test_mnist_mismatched_lengths(tmp_path):
    _write_mnist_folder(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.zeros(39, dtype=np.uint8))
    with pytest.raises(DataError, match="do not match"):
        mnist(tmp_path / "m", val_size=4)


def test_fashion_mnist_missing_folder_names_it_and_how_to_get_it(tmp_path):
    where = tmp_path / "absent"
    with pytest.raises(DataError) as err:
        fashion_mnist(where)
    msg = str(err.value)
    assert str(where) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "NNCOMPRESS_DATA" in msg


def test_fashion_mnist_missing_file_names_it(tmp_path):
    _write_mnist_folder(tmp_path / "f")
    (tmp_path / "f" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        fashion_mnist(tmp_path / "f", val_size=4)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_corrupt_file_names_it(tmp_path):
    _write_mnist_folder(tmp_path / "f")
    bad = tmp_path / "f" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*truncated.*dataset-fashion"):
        fashion_mnist(tmp_path / "f", val_size=4)


def test_fashion_mnist_env_variable(tmp_path, monkeypatch):
    _write_mnist_folder(tmp_path / "env", compress=True)
    monkeypatch.setenv("NNCOMPRESS_DATA", str(tmp_path / "env"))
    splits = fashion_mnist(val_size=5)
    assert splits.name == "fashion-mnist" and len(splits.test[1]) == 10


def test_held_out_split_deterministic_and_disjoint():
    a, b = digits(seed=0), digits(seed=0)
    torch.testing.assert_close(a.val[0], b.val[0], rtol=0, atol=0)
    torch.testing.assert_close(a.train[0], b.train[0], rtol=0, atol=0)
    c = digits(seed=1)
    assert not torch.equal(a.val[0], c.val[0])
    # disjoint: no held-out image also appears in train (digits has few exact duplicates,
    # so compare row sets: train+val is a permutation of the original training images)
    tr = {tuple(r) for r in a.train[0].flatten(1).tolist()}
    va = [tuple(r) for r in a.val[0].flatten(1).tolist()]
    overlap = sum(r in tr for r in va)
    assert overlap <= 2  # sklearn digits contains a handful of exact duplicate images
    assert len(a.train[1]) + len(a.val[1]) == 1797 - 1797 // 4
    assert len(a.val[1]) == 200


def test_held_out_split_disjoint_by_index(tmp_path):
    # unique images (each carries its index), so disjointness is exact
    n = 30
    folder = tmp_path / "u"
    folder.mkdir()
    x = np.zeros((n, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n)
    write_idx(folder / "train-images-idx3-ubyte", x)
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte", x[:5])
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    s1 = mnist(folder, val_size=7, seed=11)
    s2 = mnist(folder, val_size=7, seed=11)

    def ids(t):
        return set(((t[:, 0, 0, 0] * s1.std + s1.mean) * 255).round().int().tolist())

    tr, va = ids(s1.train[0]), ids(s1.val[0])
    assert len(va) == 7 and len(tr) == n - 7
    assert tr.isdisjoint(va) and tr | va == set(range(n))
    assert ids(s2.val[0]) == va


def test_normalisation_from_train_split(digits_data):
    s = digits_data
    x = s.train[0]
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-4)
    # val/test are normalised with the same (train) statistics, not their own
    assert float(s.test[0].mean()) != pytest.approx(0.0, abs=1e-6)
    assert s.describe()["mean"] == s.mean and s.describe()["sizes"]["val"] == 200


def test_loader_batches_and_validation():
    s = synthetic(n=100, val_size=10)
    loader = s.loader("train", 32, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert sum(len(y) for _, y in batches) == 90
    ys = torch.cat([y for _, y in batches]).sort().values
    torch.testing.assert_close(ys, s.train[1].sort().values)
    with pytest.raises(ValueError, match="split='dev'"):
        s.loader("dev")
    with pytest.raises(ValueError, match="batch_size=0"):
        s.loader("train", 0)


def test_augment_keeps_shape_and_is_seeded():
    s = synthetic(n=64, shape=(1, 8, 8), val_size=8)
    a = next(iter(s.loader("train", 16, seed=5, augment=True)))[0]
    b = next(iter(s.loader("train", 16, seed=5, augment=True)))[0]
    assert a.shape == (16, 1, 8, 8)
    torch.testing.assert_close(a, b)


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="dataset='cifar'"):
        load_dataset("cifar")


def test_val_size_validated():
    with pytest.raises(ValueError, match="val_size=5000"):
        digits(val_size=5000)
