"""The configuration of :func:`~nncompress.lowrank.decompose_`: method and rank rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..core.errors import ConfigError
from ..core.select import name_matches
from ..core.validate import config_error as _err

__all__ = ["METHODS", "DecomposeConfig"]

METHODS = ("svd", "separable", "tucker2", "cp", "tt")
_SPECTRAL = ("svd", "separable", "tucker2")  # methods with singular values (energy, vbmf)
_CHOICES = ("rank", "rank_fraction", "energy", "vbmf", "macs_budget", "params_budget")
_LAYER_KEYS = (
    "method",
    "rank",
    "rank_fraction",
    "energy",
    "vbmf",
    "min_rank",
    "tt_cores",
    "tt_in_modes",
    "tt_out_modes",
    "skip",
)


@dataclass(frozen=True)
class DecomposeConfig:
    """What to decompose and how to choose ranks (frozen; JSON/YAML-serialisable).

    Exactly one of ``rank``, ``rank_fraction``, ``energy``, ``vbmf``, ``macs_budget``,
    ``params_budget`` must be set.

    Attributes
    ----------
    method : 'svd' | 'separable' | 'tucker2' | 'cp' | 'tt'.
    rank : fixed rank (Tucker-2: both channel ranks; TT: every internal TT rank), clamped to the
        exact (full) rank.
    rank_fraction : in (0, 1]: largest rank whose factors keep at most this fraction of each
        layer's parameters.
    energy : in (0, 1]: fraction of squared singular values kept (svd, separable, tucker2).
    vbmf : ranks by empirical variational Bayesian matrix factorisation (svd, separable,
        tucker2).
    macs_budget, params_budget : in (0, 1]: the decomposed layers together keep at most this
        fraction of their original MACs (needs ``input_shape``) / parameters.
    min_rank : lower bound on every chosen rank.
    per_layer : ``{name or fnmatch pattern: {key: value}}`` overriding ``method``, the rank rule
        (``rank``/``rank_fraction``/``energy``/``vbmf``), ``min_rank``, ``tt_*``, or
        ``skip: true``.
    tt_cores : number ``d`` of TT cores when the factorisations are chosen automatically (for
        a convolution the first core is the spatial one: ``k_h k_w`` in, 1 out).
    tt_in_modes, tt_out_modes : explicit factorisations of in/out features (usually given per
        layer).
    cp_iters : ALS iterations of the CP decomposition.
    require_fewer_macs : skip layers whose factors would need more MACs than the original even
        if they have fewer parameters (set False for 'tt', which trades MACs for parameters).
    seed : random seed (CP initialisation when the rank exceeds a mode size).
    allocate : how a ``macs_budget`` / ``params_budget`` is spread over layers: 'response'
        (ranks minimising the summed relative response error under the budget, on
        calibration inputs when :func:`decompose_` gets them; svd and separable only,
        :mod:`nncompress.lowrank.allocate`), 'energy' (one singular-value energy or parameter
        fraction shared by all layers, found by bisection) or 'auto' (response for svd and
        separable, energy otherwise).
    """

    method: str = "svd"
    rank: int | None = None
    rank_fraction: float | None = None
    energy: float | None = None
    vbmf: bool = False
    macs_budget: float | None = None
    params_budget: float | None = None
    min_rank: int = 1
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    tt_cores: int = 3
    tt_in_modes: tuple[int, ...] | None = None
    tt_out_modes: tuple[int, ...] | None = None
    cp_iters: int = 100
    require_fewer_macs: bool = True
    seed: int = 0
    allocate: str = "auto"

    def __post_init__(self) -> None:
        for name in ("tt_in_modes", "tt_out_modes"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(int(x) for x in v))
        if self.allocate not in ("auto", "energy", "response"):
            raise _err("allocate", self.allocate, "must be 'auto', 'energy' or 'response'", "")
        if self.allocate == "response" and self.method not in ("svd", "separable"):
            raise _err(
                "allocate", self.allocate, "'response' needs method 'svd' or 'separable'", ""
            )
        if not isinstance(self.per_layer, dict):
            raise _err("per_layer", self.per_layer, "must be a mapping {layer: {key: value}}")
        self._validate("")
        for pattern, over in self.per_layer.items():
            if not isinstance(over, dict):
                raise _err("per_layer", over, "each override must be a mapping", pattern)
            bad = sorted(set(over) - set(_LAYER_KEYS))
            if bad:
                raise ConfigError(
                    f"per_layer[{pattern!r}]: unknown key(s) {bad}; allowed: {list(_LAYER_KEYS)}"
                )
            if not over.get("skip", False):
                self._layer_config(over, pattern)._validate(pattern)

    def _validate(self, where: str) -> None:
        if self.method not in METHODS:
            raise _err("method", self.method, f"must be one of {list(METHODS)}", where)
        chosen = [
            c for c in _CHOICES if (getattr(self, c) is not None and getattr(self, c) is not False)
        ]
        if len(chosen) != 1:
            raise ConfigError(
                f"{'layer ' + repr(where) + ': ' if where else ''}exactly one of {list(_CHOICES)} "
                f"must be set, got {chosen or 'none'}"
            )
        if self.rank is not None and (
            not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1
        ):
            raise _err("rank", self.rank, "must be an integer >= 1", where)
        for name in ("rank_fraction", "energy", "macs_budget", "params_budget"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and 0.0 < v <= 1.0):
                raise _err(name, v, "must be in (0, 1]", where)
        if not isinstance(self.vbmf, bool):
            raise _err("vbmf", self.vbmf, "must be true or false", where)
        if (self.energy is not None or self.vbmf) and self.method not in _SPECTRAL:
            rule = "energy" if self.energy is not None else "vbmf"
            raise _err(
                rule,
                getattr(self, rule),
                f"needs singular values: only for methods {list(_SPECTRAL)}, not "
                f"'{self.method}' (use rank or rank_fraction)",
                where,
            )
        if not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise _err("min_rank", self.min_rank, "must be an integer >= 1", where)
        if not isinstance(self.tt_cores, int) or self.tt_cores < 2:
            raise _err("tt_cores", self.tt_cores, "must be an integer >= 2", where)
        if not isinstance(self.cp_iters, int) or self.cp_iters < 1:
            raise _err("cp_iters", self.cp_iters, "must be an integer >= 1", where)
        for name in ("tt_in_modes", "tt_out_modes"):
            v = getattr(self, name)
            if v is not None and (len(v) < 1 or min(v) < 1):
                raise _err(name, list(v), "must be a non-empty list of integers >= 1", where)
        if (self.tt_in_modes is None) != (self.tt_out_modes is None) or (
            self.tt_in_modes is not None and len(self.tt_in_modes) != len(self.tt_out_modes)
        ):
            raise _err(
                "tt_in_modes/tt_out_modes",
                (self.tt_in_modes, self.tt_out_modes),
                "give both, with the same number of factors",
                where,
            )

    def _layer_config(self, over: dict[str, Any], where: str) -> DecomposeConfig:
        over = {k: v for k, v in over.items() if k != "skip"}
        if any(k in over for k in _CHOICES):
            base = {c: (False if c == "vbmf" else None) for c in _CHOICES}
            if "macs_budget" in over or "params_budget" in over:
                raise ConfigError(
                    f"per_layer[{where!r}]: budgets are global; give rank, rank_fraction, "
                    "energy or vbmf per layer"
                )
        else:
            base = {}
        try:
            return replace(self, per_layer={}, **{**base, **over})
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"per_layer[{where!r}]: {exc}") from None

    def for_layer(self, name: str) -> DecomposeConfig | None:
        """The config that applies to layer ``name`` (``None`` when it is marked ``skip``)."""
        for pattern, over in self.per_layer.items():
            if name_matches(name, pattern):
                return None if over.get("skip", False) else self._layer_config(over, pattern)
        return self

    @property
    def is_budget(self) -> bool:
        return self.macs_budget is not None or self.params_budget is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("tt_in_modes", "tt_out_modes"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecomposeConfig:
        from ..engine.config import config_from_dict

        return config_from_dict(cls, data)
