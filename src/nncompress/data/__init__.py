"""Datasets: IDX reader, Fashion-MNIST, MNIST (user folder), digits, synthetic."""

from .datasets import (
    DATASETS,
    BatchLoader,
    DataSplits,
    check_dataset_options,
    dataset_available,
    dataset_shape,
    digits,
    fashion_mnist,
    find_fashion_mnist,
    load_dataset,
    mnist,
    synthetic,
)
from .idx import DataError, read_idx, write_idx

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataError",
    "DataSplits",
    "check_dataset_options",
    "dataset_available",
    "dataset_shape",
    "digits",
    "fashion_mnist",
    "find_fashion_mnist",
    "load_dataset",
    "mnist",
    "read_idx",
    "synthetic",
    "write_idx",
]
