"""Search agents: DDPG (AMC), sensitivity-greedy allocation, random search.

An agent proposes candidates (kept counts ``q`` per unit, already clipped to the budget) in
rounds and observes their rewards. The search loop does not know which agent it drives, so
all three produce the same :class:`~nncompress.policy.Policy`.

- :class:`DDPGAgent` (AMC): rolls out the actor over the units, AMC's clipped actions and
  exploration (:mod:`nncompress.policy.ddpg`).
- :class:`GreedyAgent`: the sensitivity-driven baseline of SPEC section 7. Each unit is
  compressed alone to each point of a grid and scored with the proxy (Han et al. 2015's
  sensitivity analysis, generalised from per-layer sparsity to any unit); then, starting from
  the uncompressed model, the move with the smallest proxy-accuracy loss per unit of budget
  saved is taken until every budget holds (the allocation of
  :func:`nncompress.prune.sparsities_for_budget`, with the budgets' exact costs instead of
  parameter counts), and the budget left over by the last move is given back to the most
  sensitive units. One final candidate.
- :class:`RandomAgent`: uniform actions in [0, 1], clipped like DDPG's (the control).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .ddpg import DDPG, DDPGConfig
from .env import ActionSpace, Rollout

__all__ = ["AGENTS", "Agent", "DDPGAgent", "GreedyAgent", "Proposal", "RandomAgent", "make_agent"]

AGENTS = ("ddpg", "greedy", "random")


@dataclass
class Proposal:
    """One candidate: its rollout (states, raw actions, ``q``) and what it is for
    (``explore``, ``exploit``, ``random``, ``scan`` or ``final``). Scan candidates measure a
    single unit's sensitivity and need not meet the budget; they never become the policy."""

    rollout: Rollout
    tag: str
    info: dict = field(default_factory=dict)

    @property
    def q(self) -> np.ndarray:
        return self.rollout.q


class Agent:
    """Base class: ``propose(n)`` up to ``n`` candidates (``[]`` when done), ``observe``."""

    name = "base"

    def __init__(self, space: ActionSpace, seed: int = 0) -> None:
        self.space = space
        self.seed = seed
        self.episode = 0

    def total(self, episodes: int) -> int:
        """How many candidates the agent will propose when asked for ``episodes``."""
        return episodes

    def propose(self, n: int) -> list[Proposal]:
        raise NotImplementedError

    def observe(self, proposals: list[Proposal], rewards: list[float]) -> None:
        self.episode += len(proposals)


class RandomAgent(Agent):
    """Uniform random actions in [0, 1] for every unit, clipped to the budget."""

    name = "random"

    def __init__(self, space: ActionSpace, seed: int = 0) -> None:
        super().__init__(space, seed)
        self.rng = np.random.default_rng(seed)

    def propose(self, n: int) -> list[Proposal]:
        return [
            Proposal(self.space.rollout(lambda t, s: self.rng.uniform(0.0, 1.0)), "random")
            for _ in range(n)
        ]


class DDPGAgent(Agent):
    """AMC's agent: random warm-up episodes, then the actor with decaying truncated-normal
    noise; all episodes of a round use the same actor; after each round every transition is
    stored with its episode's reward and, past the warm-up, one update per transition."""

    name = "ddpg"

    def __init__(self, space: ActionSpace, seed: int = 0, config: DDPGConfig | None = None):
        super().__init__(space, seed)
        self.config = config or DDPGConfig()
        n_states = len(space.state(0, space.dense_q(), 1.0))
        self.ddpg = DDPG(n_states, len(space.units), self.config, seed)
        self.losses: list[tuple[float, float]] = []

    def propose(self, n: int) -> list[Proposal]:
        out = []
        for i in range(n):
            ep = self.episode + i
            if ep < self.config.warmup:
                roll = self.space.rollout(lambda t, s: self.ddpg.random_action())
                out.append(Proposal(roll, "explore"))
            else:
                sigma = self.ddpg.sigma(ep)
                roll = self.space.rollout(lambda t, s, sig=sigma: self.ddpg.act(s, sig))
                out.append(Proposal(roll, "exploit", {"sigma": sigma}))
        return out

    def observe(self, proposals: list[Proposal], rewards: list[float]) -> None:
        for p, r in zip(proposals, rewards, strict=True):
            self.ddpg.remember(p.rollout.states, p.rollout.actions, r)
            if self.episode >= self.config.warmup:
                for _ in range(len(p.rollout.states)):
                    self.losses.append(self.ddpg.update())
            self.episode += 1


def _grid(space: ActionSpace, t: int) -> list[int]:
    """Kept counts probed for unit ``t`` (decreasing; the lowest allowed level included)."""
    u = space.units[t]
    a = space.actions
    if u.kind == "filter":
        fr = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    elif u.kind == "sparsity":
        fr = [0.7, 0.5, 0.3, 0.2, 0.12, 0.08, 0.05, 0.03, 0.02, 0.01]
    else:
        return list(range(u.hi - 1, u.lo - 1, -1))
    qs = {u.q_of(f) for f in fr} | {u.lo}
    lowest = u.lo if u.kind == "filter" else max(u.lo, int(np.ceil(a.min_density * u.full)))
    return sorted((q for q in qs if lowest <= q < u.hi), reverse=True)


class GreedyAgent(Agent):
    """Sensitivity scan then greedy allocation under the budgets (see the module docstring)."""

    name = "greedy"

    def __init__(self, space: ActionSpace, seed: int = 0) -> None:
        super().__init__(space, seed)
        self.scan: list[tuple[int, int]] = [
            (t, q) for t in range(len(space.units)) for q in _grid(space, t)
        ]
        self.accuracy: dict[tuple[int, int], float] = {}
        self.baseline: float | None = None
        self._next = 0
        self._final_sent = False
        self.allocation: np.ndarray | None = None

    def total(self, episodes: int) -> int:
        return len(self.scan) + 1

    def set_baseline(self, accuracy: float) -> None:
        self.baseline = accuracy

    def propose(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        dense = self.space.dense_q()
        while len(out) < n and self._next < len(self.scan):
            t, q = self.scan[self._next]
            trial = dense.copy()
            trial[t] = q
            states = np.zeros((len(dense), 0))
            roll = Rollout(
                states,
                trial / np.array([u.full for u in self.space.units]),
                trial,
                trial / np.array([u.full for u in self.space.units]),
            )
            out.append(Proposal(roll, "scan", {"unit": t, "q": int(q)}))
            self._next += 1
        if len(out) < n and self._next >= len(self.scan) and not self._final_sent:
            if len(self.accuracy) < len(self.scan):
                return out  # the scan results are still being evaluated
            q = self._allocate()
            full = np.array([u.full for u in self.space.units])
            out.append(Proposal(Rollout(np.zeros((len(q), 0)), q / full, q, q / full), "final"))
            self._final_sent = True
        return out

    def observe(self, proposals: list[Proposal], rewards: list[float]) -> None:
        for p in proposals:
            if p.tag == "scan":
                self.accuracy[(p.info["unit"], p.info["q"])] = p.info["accuracy"]
        self.episode += len(proposals)

    def _losses(self) -> list[dict[int, float]]:
        """Per unit, proxy-accuracy loss at each probed count (running max over deeper
        compression, so that the loss never falls as a unit is compressed more)."""
        base = self.baseline if self.baseline is not None else max(self.accuracy.values())
        out = []
        for t, u in enumerate(self.space.units):
            qs = [q for (tt, q) in self.scan if tt == t]  # decreasing
            run, worst = {u.hi: 0.0}, 0.0
            for q in qs:
                worst = max(worst, base - self.accuracy[(t, q)])
                run[q] = worst
            out.append(run)
        return out

    def _allocate(self) -> np.ndarray:
        space = self.space
        loss = self._losses()
        keys = list(space.targets)
        q = space.dense_q()

        def deficit(c: dict[str, float]) -> float:
            return sum(max(0.0, c[k] - space.targets[k]) / space.reference[k] for k in keys)

        cur = space.costs(q)
        while not space.feasible(q):
            best = None
            for t in range(len(space.units)):
                levels = sorted((lv for lv in loss[t] if lv < q[t]), reverse=True)
                for lv in levels:
                    trial = q.copy()
                    trial[t] = lv
                    c = space.costs(trial)
                    saved = deficit(cur) - deficit(c)
                    if saved <= 0:
                        saved = sum((cur[k] - c[k]) / space.reference[k] for k in keys)
                    if saved <= 0:
                        continue
                    key = (max(0.0, loss[t][lv] - loss[t][q[t]]) / saved, -saved, t, lv)
                    if best is None or key < best:
                        best = key
            if best is None:  # pragma: no cover - the lowest levels are feasible (checked)
                q = space.min_q()
                break
            q[best[2]] = best[3]
            cur = space.costs(q)
        # give the budget left by the last move back, most sensitive units first
        order = sorted(range(len(q)), key=lambda t: -loss[t].get(int(q[t]), 0.0))
        for t in order:
            lo, hi = int(q[t]), space.units[t].hi
            while lo < hi:
                mid = (lo + hi + 1) // 2
                trial = q.copy()
                trial[t] = mid
                if space.feasible(trial):
                    lo = mid
                else:
                    hi = mid - 1
            q[t] = lo
        self.allocation = q
        return q


def make_agent(
    name: str, space: ActionSpace, seed: int = 0, ddpg: DDPGConfig | None = None
) -> Agent:
    if name == "ddpg":
        return DDPGAgent(space, seed, ddpg)
    if name == "greedy":
        return GreedyAgent(space, seed)
    if name == "random":
        return RandomAgent(space, seed)
    from ..core.errors import ConfigError

    raise ConfigError(f"agent={name!r}: must be one of {AGENTS}")
