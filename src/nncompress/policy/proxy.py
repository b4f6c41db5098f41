"""Settings of the fast accuracy proxy of a policy search (AMC section 3.2).

Each candidate is applied to a copy of the model, the layers that lost input channels are
refitted by least squares to the original responses (AMC's channel-pruning reconstruction),
and the copy is evaluated on a fixed subset of the held-out split, without fine-tuning. The
evaluation itself is model work and lives with the model adapter
(:mod:`nncompress.stages.search_model`); this is its configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.errors import ConfigError

__all__ = ["ProxyConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    """How candidates are scored.

    Attributes
    ----------
    val_samples : size of the fixed held-out subset (drawn once with ``seed`` from the val
        split; all of it if smaller).
    calib_samples : training images used for the least-squares refit.
    points_per_image : output positions sampled per calibration image (AMC: 10).
    refit : refit the layers that lost input channels (filter pruning only).
    ridge : Tikhonov weight of the refit.
    batch_size : evaluation batch size.
    threads : torch threads while a candidate is evaluated (same in every executor, so the
        local and the Ray executor give bit-identical results).
    seed : seeds the subsets and the sampled positions.
    """

    val_samples: int = 1000
    calib_samples: int = 128
    points_per_image: int = 16
    refit: bool = True
    ridge: float = 1e-4
    batch_size: int = 250
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_samples", "calib_samples", "points_per_image", "batch_size", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"proxy.{name}={v!r}: must be an integer >= 1")
        if not isinstance(self.refit, bool):
            raise ConfigError(f"proxy.refit={self.refit!r}: must be true or false")
        if not self.ridge >= 0:
            raise ConfigError(f"proxy.ridge={self.ridge!r}: must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
