"""The search environment of AMC (He et al., ECCV 2018): units, layer embedding, clipped actions.

The agent walks over the model's *units* in forward order and picks one action per unit:

- ``filter``: a coupled channel group of :mod:`nncompress.prune.graph` (a residual chain is
  one unit: coupled layers share one action); the action is the fraction of the group's
  prunable channels kept (AMC's "preserve ratio"), channels chosen by L1 norm (Li et al.);
- ``sparsity``: one Conv/Linear layer; the action is the fraction of its weights kept
  (Han et al. connection pruning, AMC's fine-grained pruning);
- ``bits``: one layer; the action picks its shared-weight bits from a list (Deep Compression).

State (AMC section 3.1, eq. 1), per unit ``t``: ``(t, kind, layer type, c_in, c_out, h*w,
stride, kernel, MACs[t], reduced, rest, a_{t-1})``; the static features are min-max
normalised over the units, ``reduced`` is the fraction of MACs removed by the actions so far,
``rest`` the fraction of MACs in the units after ``t``, ``a_{t-1}`` the previous (clipped)
action.

Actions are clipped as in AMC section 3.3 ("we limit the action space"): action ``a_t`` is
lowered to the largest value for which the budget can still be met when every later unit is
compressed as much as allowed. The first action is therefore always feasible if the budget
is (checked before any episode), and by induction the final assignment meets every budget
exactly under the :class:`~nncompress.policy.budget.CostModel`. Counts are integers (channels,
weights, bit choices), so the clip is a bisection over them, not a formula.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.errors import ConfigError
from ..core.policy import Policy
from .budget import Budget, CostModel
from .units import KINDS, ActionsConfig, Unit

__all__ = ["FEATURES", "KINDS", "ActionSpace", "ActionsConfig", "Rollout", "Unit"]

log = logging.getLogger(__name__)

_KIND_CODE = {"filter": 0.0, "sparsity": 0.5, "bits": 1.0}
FEATURES = (
    "index",
    "kind",
    "type",
    "c_in",
    "c_out",
    "positions",
    "stride",
    "kernel",
    "macs",
    "reduced",
    "rest",
    "prev_action",
)
_STATIC = 9  # the first nine features are static and min-max normalised


@dataclass
class Rollout:
    """One episode's trajectory: states ``(T, F)``, raw agent actions, kept counts ``q`` and
    the clipped actions ``q / full``."""

    states: np.ndarray
    actions: np.ndarray
    q: np.ndarray
    clipped: np.ndarray


class ActionSpace:
    """Units, cost model, budgets and layer embedding of one model (see the module docstring).

    Parameters
    ----------
    units : the decisions of an episode, in forward order (built from a model by
        :func:`nncompress.stages.search_model.analyse`).
    cost : the exact :class:`~nncompress.policy.budget.CostModel` of the same model.
    budgets : what every episode must meet; one that cannot be met even with every unit at
        its minimum raises :class:`~nncompress.core.ConfigError` here, before any episode.
    actions : the :class:`ActionsConfig` the units were built with.
    """

    def __init__(
        self,
        units: list[Unit],
        cost: CostModel,
        budgets: Sequence[Budget],
        actions: ActionsConfig,
    ) -> None:
        if not units:
            raise ConfigError(
                f"actions={actions.to_dict()}: no layer of the model can be compressed (every "
                "group is fixed or excluded)"
            )
        for b in budgets:
            if b.metric == "latency" and b.batch not in cost.latency:
                raise ConfigError(f"budget {b}: no latency model was fitted at batch {b.batch}")
        self.units = units
        self.cost = cost
        self.budgets = tuple(budgets)
        self.actions = actions
        self.unit_macs, self._static = self._static_features(units, cost.layers, cost)
        self._metric_keys = [self._key(b) for b in self.budgets]
        t = len(units)
        self._rest = np.array([self.unit_macs[i + 1 :].sum() for i in range(t)], dtype=float)
        self.reference = self._costs(self.dense_q(), dense=True)
        self.targets = {
            self._key(b): b.fraction * self.reference[self._key(b)] for b in self.budgets
        }
        self._check_reachable()

    # ---- construction ---------------------------------------------------------------------------

    @staticmethod
    def _key(b: Budget) -> str:
        return f"latency@{b.batch}" if b.metric == "latency" else b.metric

    @staticmethod
    def _static_features(units, layers, cost) -> tuple[np.ndarray, np.ndarray]:
        dense_macs = cost._pos * cost.numel(cost._n_out, cost._n_in)  # (n_layers,)
        unit_macs = np.zeros(len(units))
        rows = []
        for t, u in enumerate(units):
            g = layers[u.layer_index]
            if u.kind == "filter":
                table = u.table
                touched = set(table.out) | set(table.inp)
                unit_macs[t] = float(sum(dense_macs[i] for i in touched))
            else:
                unit_macs[t] = float(dense_macs[u.layer_index])
            kside = round(math.sqrt(g.kernel)) if g.kind != "linear" else 1
            kind = {"conv": 0.0, "depthwise": 0.5, "linear": 1.0}[g.kind]
            rows.append(
                [
                    t,
                    _KIND_CODE[u.kind],
                    kind,
                    g.n_in,
                    g.n_out,
                    g.positions,
                    g.stride,
                    kside,
                    unit_macs[t],
                ]
            )
        static = np.array(rows, dtype=float)  # (T, 9)
        lo, hi = static.min(0), static.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        static = np.where(hi > lo, (static - lo) / span, 0.0)
        return unit_macs, static

    def with_budgets(self, budgets: Sequence[Budget]) -> ActionSpace:
        """The same units and cost model under other budgets (latency needs a fitted model)."""
        return ActionSpace(self.units, self.cost, budgets, self.actions)

    # ---- costs -------------------------------------------------------------------------------

    def dense_q(self) -> np.ndarray:
        """Kept counts of the uncompressed model (every unit at ``hi``)."""
        return np.array([u.hi for u in self.units], dtype=np.int64)

    def min_q(self) -> np.ndarray:
        """The most compression the action space allows (every unit at ``lo``)."""
        return np.array([u.lo for u in self.units], dtype=np.int64)

    def assignment(self, q: Sequence[int], dense: bool = False):
        """``(removed per filter unit, sparsity per layer, bits per layer)`` of ``q``."""
        n = self.cost.n_layers
        removed: list[int] = []
        sparsity = np.zeros(n)
        bits = np.full(n, self.actions.storage_bits, dtype=np.int64)
        for u, qu in zip(self.units, q, strict=True):
            if u.kind == "filter":
                removed.append(0 if dense else u.prunable - int(qu))
            elif u.kind == "sparsity" and not dense:
                # the very float the Policy stores, so that rounding matches prune_ exactly
                sparsity[u.layer_index] = (u.full - int(qu)) / u.full
            elif u.kind == "bits":
                bits[u.layer_index] = 0 if dense else self.actions.bits[int(qu)]
        if dense:
            bits[:] = 0
        return removed, sparsity, bits

    def _costs(self, q: Sequence[int], dense: bool = False) -> dict[str, float]:
        removed, sparsity, bits = self.assignment(q, dense)
        metrics = {"macs", "dense_macs", "params", "bytes", *self._metric_keys}
        return self.cost.evaluate(removed, sparsity, bits, metrics=sorted(metrics))

    def costs(self, q: Sequence[int]) -> dict[str, float]:
        """Every metric of ``q`` (absolute values, per sample)."""
        return self._costs(q)

    def fractions(self, q: Sequence[int]) -> dict[str, float]:
        """Every metric of ``q`` as a fraction of the uncompressed model."""
        c = self._costs(q)
        return {k: (v / self.reference[k] if self.reference[k] else 1.0) for k, v in c.items()}

    def feasible(self, q: Sequence[int]) -> bool:
        if not self._metric_keys:
            return True
        removed, sparsity, bits = self.assignment(q)
        c = self.cost.evaluate(removed, sparsity, bits, metrics=self._metric_keys)
        return all(c[k] <= self.targets[k] * (1 + 1e-12) for k in self._metric_keys)

    def _check_reachable(self) -> None:
        q = self.min_q()
        c = self._costs(q)
        for b in self.budgets:
            k = self._key(b)
            if c[k] > self.targets[k] * (1 + 1e-12):
                best = c[k] / self.reference[k]
                raise ConfigError(
                    f"budget {b}: unreachable; compressing every unit as much as allowed "
                    f"(min_keep={self.actions.min_keep}, min_density={self.actions.min_density}"
                    f", bits={list(self.actions.bits)}, exclude={list(self.actions.exclude)}) "
                    f"keeps {best:.4f} of the {b.metric}"
                )

    # ---- the AMC step ------------------------------------------------------------------------

    def clip(self, t: int, action: float, q: np.ndarray) -> int:
        """AMC's action wall: the kept count for unit ``t`` from ``action`` in [0, 1], lowered
        until the budgets hold with ``q[:t]`` as decided and every later unit at ``lo``."""
        u = self.units[t]
        want = u.q_of(action)
        trial = q.copy()
        trial[t + 1 :] = self.min_q()[t + 1 :]
        trial[t] = want
        if self.feasible(trial):
            return want
        lo, hi = u.lo, want  # lo is feasible by induction (checked before the first episode)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial[t] = mid
            if self.feasible(trial):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def state(self, t: int, q: np.ndarray, prev_action: float) -> np.ndarray:
        """Embedding of unit ``t`` (12 features, see ``FEATURES``) with ``q[:t]`` decided."""
        trial = self.dense_q()
        trial[:t] = q[:t]
        c = self._costs(trial)
        ref = self.reference["dense_macs"]
        reduced = (ref - c["dense_macs"]) / ref if ref else 0.0
        rest = self._rest[t] / ref if ref else 0.0
        return np.concatenate([self._static[t], [reduced, rest, prev_action]]).astype(np.float64)

    def rollout(self, actor: Callable[[int, np.ndarray], float]) -> Rollout:
        """Run one episode: ``actor(t, state) -> action in [0, 1]`` for every unit in order."""
        n = len(self.units)
        q = self.dense_q()
        states = np.zeros((n, len(FEATURES)))
        actions = np.zeros(n)
        clipped = np.zeros(n)
        prev = 1.0
        for t, u in enumerate(self.units):
            states[t] = self.state(t, q, prev)
            a = float(actor(t, states[t]))
            actions[t] = a
            q[t] = self.clip(t, a, q)
            clipped[t] = q[t] / u.full
            prev = clipped[t]
        return Rollout(states, actions, q, clipped)

    # ---- results -----------------------------------------------------------------------------

    def policy(self, q: Sequence[int], info: dict | None = None) -> Policy:
        filt: dict[str, float] = {}
        sparsity: dict[str, float] = {}
        bits: dict[str, int] = {}
        for u, qu in zip(self.units, q, strict=True):
            if u.kind == "filter":
                r = (u.prunable - int(qu)) / u.prunable
                for p in u.layers:
                    filt[p] = r
            elif u.kind == "sparsity":
                sparsity[u.name] = (u.full - int(qu)) / u.full
            else:
                bits[u.name] = self.actions.bits[int(qu)]
        return Policy(
            filter=filt,
            sparsity=sparsity,
            bits=bits,
            criterion=self.actions.criterion,
            min_channels=self.actions.min_channels,
            info=info or {},
        )

    def describe(self) -> dict:
        return {
            "units": [u.to_dict() for u in self.units],
            "reference": self.reference,
            "targets": self.targets,
            "budgets": [b.to_dict() for b in self.budgets],
            "actions": self.actions.to_dict(),
            "latency": {b: m.to_dict() for b, m in self.cost.latency.items()},
        }
