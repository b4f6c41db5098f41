"""Recipe stages: adapters from validated configs to the library's model transforms."""

from .base import StageContext

__all__ = ["StageContext"]
