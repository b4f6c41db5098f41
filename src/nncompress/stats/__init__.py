"""Model statistics: parameters, nonzeros, bytes, MACs and measured latency."""

from .counting import LayerStats, ModelStats, count_macs, measure_latency, model_stats
from .table import format_table

__all__ = [
    "LayerStats",
    "ModelStats",
    "count_macs",
    "format_table",
    "measure_latency",
    "model_stats",
]
