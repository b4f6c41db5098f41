"""Model statistics: parameters, nonzeros, bytes, MACs and measured latency."""

from .counting import (
    LayerStats,
    ModelStats,
    count_macs,
    is_mac_layer,
    layer_macs,
    measure_latency,
    model_stats,
)
from .latency import DataLatency, measure_latency_over
from .table import format_table

__all__ = [
    "DataLatency",
    "LayerStats",
    "ModelStats",
    "count_macs",
    "format_table",
    "is_mac_layer",
    "layer_macs",
    "measure_latency",
    "measure_latency_over",
    "model_stats",
]
