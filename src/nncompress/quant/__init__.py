"""Quantization: trained weight sharing (k-means), linear integer quantization."""

from .kmeans import (
    KMeansConfig,
    KMeansQuantizer,
    LayerShareReport,
    SharedWeight,
    ShareReport,
    kmeans_1d,
    share_from_values_,
    share_weights_,
    shared_layers,
    sharing_compression_rate,
)

__all__ = [
    "KMeansConfig",
    "KMeansQuantizer",
    "LayerShareReport",
    "ShareReport",
    "SharedWeight",
    "kmeans_1d",
    "share_from_values_",
    "share_weights_",
    "shared_layers",
    "sharing_compression_rate",
]
