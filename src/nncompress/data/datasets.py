"""Datasets as in-memory tensors with a deterministic train / held-out / test split.

Every dataset is returned as a :class:`DataSplits`: images normalised with statistics computed on
the training part only, a held-out part carved from the training set (for calibration,
sensitivity scans and early stopping) and the untouched test split (final reporting only).
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .idx import DataError, read_idx

__all__ = [
    "BatchLoader",
    "DataSplits",
    "DATASETS",
    "check_dataset_options",
    "dataset_available",
    "dataset_shape",
    "digits",
    "fashion_mnist",
    "find_fashion_mnist",
    "load_dataset",
    "mnist",
    "synthetic",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = (
    "install Debian's package with 'apt-get install dataset-fashion-mnist', or pass "
    "--data-dir / set NNCOMPRESS_DATA to a folder with the four IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)"
)


@dataclass(frozen=True)
class DataSplits:
    """A dataset split into train / held-out (val) / test tensors, already normalised.

    Attributes
    ----------
    train, val, test : tuple of tensors ``(x, y)``; ``x`` is float32 ``(N, C, H, W)`` or
        ``(N, F)``, ``y`` int64 ``(N,)``.
    mean, std : normalisation statistics of the raw training pixels (scaled to [0, 1]).
    """

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    mean: float
    std: float

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])

    def loader(
        self,
        split: str,
        batch_size: int = 128,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        augment: bool = False,
        limit: int | None = None,
    ) -> BatchLoader:
        """A :class:`BatchLoader` over ``split`` in {'train', 'val', 'test'}."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: must be one of 'train', 'val', 'test'")
        x, y = getattr(self, split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        if shuffle is None:
            shuffle = split == "train"
        return BatchLoader(x, y, batch_size, shuffle=shuffle, seed=seed, augment=augment)

    def describe(self) -> dict:
        """JSON-able description stored in checkpoint sidecars."""
        return {
            "name": self.name,
            "mean": self.mean,
            "std": self.std,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "sizes": {
                "train": len(self.train[1]),
                "val": len(self.val[1]),
                "test": len(self.test[1]),
            },
        }


class BatchLoader:
    """Iterates ``(x, y)`` mini-batches from in-memory tensors.

    Slicing whole tensors is several times faster on CPU than ``torch.utils.data.DataLoader``
    with per-sample indexing, which matters when a benchmark trains dozens of models. With
    ``augment=True`` (images only) each batch gets a random shift of up to 2 pixels (padding
    then cropping) — the standard light augmentation for 28x28 images.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 128,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment = shuffle, augment and x.dim() == 4
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    @property
    def dataset_size(self) -> int:
        return len(self.y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self._gen) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                xb, yb = (
                    self.x[start : start + self.batch_size],
                    self.y[start : start + self.batch_size],
                )
            else:
                idx = order[start : start + self.batch_size]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = self._shift(xb)
            yield xb, yb

    def _shift(self, xb: torch.Tensor, pad: int = 2) -> torch.Tensor:
        b, _, h, w = xb.shape
        padded = torch.nn.functional.pad(xb, (pad, pad, pad, pad), mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=self._gen).tolist()
        out = padded[:, :, dy : dy + h, dx : dx + w]
        flip = torch.rand(b, generator=self._gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.contiguous()


def max_samples() -> int | None:
    """``$NNCOMPRESS_MAX_SAMPLES``: when set to ``N``, every dataset keeps only the first ``N``
    training samples and ``N // 4`` held-out and test samples (normalised with the full
    training statistics), for smoke runs of documented commands (the documentation test runs
    every README command this way). Unset or empty: the whole dataset."""
    text = os.environ.get("NNCOMPRESS_MAX_SAMPLES", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 4:
        raise DataError(f"NNCOMPRESS_MAX_SAMPLES={text!r}: must be an integer >= 4")
    return int(text)


def _finish(
    name: str,
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    num_classes: int,
    val_size: int,
    seed: int,
    scale: float,
) -> DataSplits:
    """Scale to [0, 1], carve the held-out split deterministically, normalise by train stats.

    Refuses labels outside ``[0, num_classes)``, non-finite pixels and constant images
    (nothing to learn; the normalisation would divide by zero), naming the split."""
    if not 0 <= val_size < len(ytr):
        raise ValueError(f"val_size={val_size}: must be in [0, {len(ytr)})")
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        y = np.asarray(y)
        if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
            raise DataError(
                f"{name}: {split} label {bad} is outside the {num_classes} classes "
                f"[0, {num_classes - 1}]"
            )
        x = np.asarray(x)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{name}: {split} images hold NaN or infinite values")
    xtr = torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32) / scale)
    xte = torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32) / scale)
    ytr = torch.from_numpy(np.asarray(ytr, dtype=np.int64))
    yte = torch.from_numpy(np.asarray(yte, dtype=np.int64))
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    mean = float(xtr[train_idx].mean())
    std = float(xtr[train_idx].std())
    if not std > 1e-6 or not np.isfinite(std):  # float32 rounding leaves ~1e-9 for a constant
        raise DataError(
            f"{name}: the training images are constant (pixel std {std:.3g}): nothing to learn"
        )

    def norm(t: torch.Tensor) -> torch.Tensor:
        return (t - mean) / std

    cap = max_samples()
    if cap is not None:  # a smoke run: the first samples of each split (sizes in describe())
        train_idx, val_idx = train_idx[:cap], val_idx[: max(1, cap // 4)]
        xte, yte = xte[: max(1, cap // 4)], yte[: max(1, cap // 4)]
    return DataSplits(
        name=name,
        train=(norm(xtr[train_idx]), ytr[train_idx]),
        val=(norm(xtr[val_idx]), ytr[val_idx]),
        test=(norm(xte), yte),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


def _locate(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing IDX file '{folder / stem}[.gz]'")


def _read_idx_cached(path: Path) -> np.ndarray:
    """:func:`read_idx`, remembered per file (path, size, modification time) for the life of the
    process: a session that loads a dataset several times (the documentation test, a notebook)
    decompresses the ~30 MB of Fashion-MNIST once. The array is read-only."""
    st = path.stat()
    return _read_idx_key(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_idx_key(path: str, size: int, mtime_ns: int) -> np.ndarray:
    arr = read_idx(Path(path))
    arr.setflags(write=False)
    return arr


def _load_idx_folder(name: str, folder: Path, val_size: int, seed: int, hint: str) -> DataSplits:
    if not folder.is_dir():
        raise DataError(f"{name}: data folder '{folder}' does not exist; {hint}")
    try:
        arrays = {k: _read_idx_cached(_locate(folder, stem)) for k, stem in _IDX_FILES.items()}
    except DataError as exc:
        raise DataError(f"{name}: {exc}; {hint}") from exc
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or len(xi) != len(yi):
            raise DataError(
                f"{name}: {split} images {xi.shape} and labels {yi.shape} do not match "
                "(expected (N, H, W) and (N,))"
            )
        if yi.dtype.kind not in "ui":
            raise DataError(f"{name}: {split} labels are {yi.dtype}, must be integers 0..9")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"{name}: train images are {arrays['train_images'].shape[1:]} but test images "
            f"{arrays['test_images'].shape[1:]}: both splits must have the same image size"
        )
    xtr = arrays["train_images"][:, None]  # (N, 1, 28, 28)
    xte = arrays["test_images"][:, None]
    return _finish(
        name, xtr, arrays["train_labels"], xte, arrays["test_labels"], 10, val_size, seed, 255.0
    )


def find_fashion_mnist(data_dir: str | Path | None = None) -> Path:
    """Where Fashion-MNIST lives: ``data_dir``, else ``$NNCOMPRESS_DATA``, else Debian's folder.

    Debian's ``dataset-fashion-mnist`` location is taken from ``dpkg -L`` when available.
    """
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("NNCOMPRESS_DATA"):
        return Path(os.environ["NNCOMPRESS_DATA"])
    if DEBIAN_FASHION_MNIST.is_dir():
        return DEBIAN_FASHION_MNIST
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for line in listing.splitlines():
        if line.endswith("train-images-idx3-ubyte.gz"):
            return Path(line).parent
    return DEBIAN_FASHION_MNIST


def fashion_mnist(
    data_dir: str | Path | None = None, *, val_size: int = 5000, seed: int = 0
) -> DataSplits:
    """Fashion-MNIST (Xiao et al. 2017): 60k train (minus ``val_size`` held out) / 10k test."""
    return _load_idx_folder(
        "fashion-mnist",
        find_fashion_mnist(data_dir),
        val_size,
        seed,
        f"to get Fashion-MNIST, {_HOW_TO_GET}",
    )


def mnist(data_dir: str | Path | None = None, *, val_size: int = 5000, seed: int = 0) -> DataSplits:
    """MNIST from a user-given folder of the four IDX files (nothing is downloaded)."""
    if data_dir is None:
        data_dir = os.environ.get("NNCOMPRESS_MNIST")
    if data_dir is None:
        raise DataError(
            "mnist: no folder given; pass --data-dir (or set NNCOMPRESS_MNIST) to a "
            "folder with train-images-idx3-ubyte[.gz] and the three other IDX files"
        )
    return _load_idx_folder(
        "mnist",
        Path(data_dir),
        val_size,
        seed,
        "MNIST is not downloaded by nncompress: give a folder of IDX files",
    )


def digits(data_dir: str | Path | None = None, *, val_size: int = 200, seed: int = 0) -> DataSplits:
    """scikit-learn's 8x8 ``digits`` (1797 images) as ``(N, 1, 8, 8)``; 25% is the test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - dev extra
        raise DataError("digits needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target
    perm = np.random.default_rng(1234).permutation(len(y))
    n_test = len(y) // 4
    te, tr = perm[:n_test], perm[n_test:]
    return _finish("digits", x[tr], y[tr], x[te], y[te], 10, val_size, seed, 16.0)


def synthetic(
    data_dir: str | Path | None = None,
    *,
    n: int = 512,
    shape: tuple[int, ...] = (1, 8, 8),
    num_classes: int = 4,
    val_size: int = 64,
    seed: int = 0,
) -> DataSplits:
    """A tiny learnable set for tests: class = argmax of fixed random projections + noise."""
    g = np.random.default_rng(seed)
    feats = int(np.prod(shape))
    proj = g.normal(size=(feats, num_classes))
    x = g.normal(size=(n + n // 4, feats)).astype(np.float32)
    y = (x @ proj + 0.1 * g.normal(size=(len(x), num_classes))).argmax(1)
    x = x.reshape(-1, *shape)
    return _finish("synthetic", x[:n], y[:n], x[n:], y[n:], num_classes, val_size, seed, 1.0)


DATASETS = {
    "fashion-mnist": fashion_mnist,
    "mnist": mnist,
    "digits": digits,
    "synthetic": synthetic,
}


# ranges of the datasets' keyword options (what a recipe's ``data:`` mapping may give)
_OPTION_RANGES = {"val_size": (0, 1 << 24), "seed": (0, 2**63 - 1), "n": (8, 1 << 20),
                  "num_classes": (2, 1000)}  # fmt: skip


def check_dataset_options(name: str, options: dict) -> None:
    """Refuse options dataset ``name`` does not take, or of the wrong type or range (the
    options of a recipe's ``data:`` mapping), naming the option and what is allowed."""
    import inspect

    if name not in DATASETS:
        raise DataError(f"data={name!r}: must be one of {sorted(DATASETS)}")
    allowed = [p for p in inspect.signature(DATASETS[name]).parameters if p != "data_dir"]
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        raise DataError(f"data: unknown option(s) {unknown} for {name!r}; allowed: {allowed}")
    for k, v in options.items():
        if k == "shape":
            ok = (
                isinstance(v, list | tuple)
                and 1 <= len(v) <= 4
                and all(
                    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 4096 for d in v
                )
            )
            if not ok:
                raise DataError(f"data.shape={v!r:.60}: must be 1-4 sizes in [1, 4096]")
            continue
        lo, hi = _OPTION_RANGES[k]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise DataError(f"data.{k}={v!r:.60}: must be an integer in [{lo}, {hi}]")


def dataset_shape(name: str, options: dict | None = None) -> tuple[tuple[int, ...], int]:
    """``(input_shape, num_classes)`` of dataset ``name`` with ``options``, without loading
    it (what a model built for it needs)."""
    import inspect

    if name in ("fashion-mnist", "mnist"):
        return (1, 28, 28), 10
    if name == "digits":
        return (1, 8, 8), 10
    if name == "synthetic":
        params = inspect.signature(synthetic).parameters
        opts = options or {}
        shape = opts.get("shape", params["shape"].default)
        return tuple(shape), int(opts.get("num_classes", params["num_classes"].default))
    raise DataError(f"data={name!r}: must be one of {sorted(DATASETS)}")


def dataset_available(name: str, data_dir: str | Path | None = None) -> None:
    """Check, without loading it, that dataset ``name`` can be loaded: its IDX files exist
    (fashion-mnist, mnist) or scikit-learn is installed (digits). Raises :class:`DataError`."""
    if name not in DATASETS:
        raise DataError(f"data={name!r}: must be one of {sorted(DATASETS)}")
    if name in ("fashion-mnist", "mnist"):
        if name == "mnist" and data_dir is None and not os.environ.get("NNCOMPRESS_MNIST"):
            raise DataError("mnist: no folder given; set data_dir (or NNCOMPRESS_MNIST)")
        folder = (
            find_fashion_mnist(data_dir)
            if name == "fashion-mnist"
            else Path(data_dir or os.environ["NNCOMPRESS_MNIST"])
        )
        if not folder.is_dir():
            raise DataError(f"{name}: data folder '{folder}' does not exist; {_HOW_TO_GET}")
        for stem in _IDX_FILES.values():
            _locate(folder, stem)
    elif name == "digits":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise DataError("digits needs scikit-learn: pip install scikit-learn")


def load_dataset(name: str, data_dir: str | Path | None = None, **kwargs) -> DataSplits:
    """Load a dataset by name: one of :data:`DATASETS` (options checked first)."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r}: must be one of {sorted(DATASETS)}")
    check_dataset_options(name, kwargs)
    return DATASETS[name](data_dir, **kwargs)
