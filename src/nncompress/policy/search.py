"""The policy search loop (AMC, He et al., ECCV 2018): agent -> candidates -> executor -> reward.

Per round the agent proposes ``episodes_per_round`` candidates (clipped to the budgets), the
executor scores them with the proxy (in parallel on Ray), the rewards go back to the agent,
and the round is appended to ``episodes.jsonl`` in the output folder. The round size is part
of the configuration, not of the executor, so a seeded search gives the same episodes
locally and on Ray.

Reward (AMC section 3.3): under the hard budget (actions clipped), ``R = -error`` (``error`` =
1 - proxy accuracy); ``error_log_macs`` gives AMC's ``R = -error * log(MACs)`` for searches
that should also prefer fewer MACs.

Resume: a search started again on the same output folder reads ``episodes.jsonl``, replays
the logged rounds through the agent with their logged rewards (no evaluation; the replayed
candidates are checked against the log) and continues the episode count; the folder's
``search.json`` must describe the same model and configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..core.errors import ConfigError
from ..core.files import atomic_write
from ..core.policy import Policy
from ..core.progress import ProgressEvent
from .agents import AGENTS, GreedyAgent, make_agent
from .budget import Budget, parse_budgets
from .ddpg import DDPGConfig
from .env import ActionsConfig, ActionSpace
from .executor import Executor, LocalExecutor
from .proxy import ProxyConfig

__all__ = ["REWARDS", "SearchConfig", "SearchProblem", "SearchResult", "search"]

log = logging.getLogger(__name__)

REWARDS = ("error", "error_log_macs")
EPISODES_FILE = "episodes.jsonl"
META_FILE = "search.json"
POLICY_FILE = "policy.json"


@dataclass(frozen=True)
class SearchConfig:
    """A policy search.

    Attributes
    ----------
    budgets : what to keep at most, e.g. ``"macs=0.5"`` or ``"macs=0.5,params=0.4"``.
    agent : ``ddpg`` (AMC), ``greedy`` (sensitivity) or ``random``.
    episodes : candidates to evaluate (DDPG, random); the greedy agent needs one per
        sensitivity probe plus one.
    episodes_per_round : candidates proposed (and evaluated in parallel) per round.
    reward : ``error`` (``-error`` under the hard budget) or ``error_log_macs``.
    seed : seeds the agent (network init, noise, random actions).
    actions, proxy, ddpg : :class:`ActionsConfig`, :class:`ProxyConfig`, :class:`DDPGConfig`.
    """

    budgets: tuple[Budget, ...] | str = "macs=0.5"
    agent: str = "ddpg"
    episodes: int = 300
    episodes_per_round: int = 2
    reward: str = "error"
    seed: int = 0
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    ddpg: DDPGConfig = field(default_factory=DDPGConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", parse_budgets(self.budgets))
        if self.agent not in AGENTS:
            raise ConfigError(f"agent={self.agent!r}: must be one of {AGENTS}")
        for name in ("episodes", "episodes_per_round"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be an integer >= 1")
        if self.reward not in REWARDS:
            raise ConfigError(f"reward={self.reward!r}: must be one of {REWARDS}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r}: must be an integer")
        for name, cls in (("actions", ActionsConfig), ("proxy", ProxyConfig), ("ddpg", DDPGConfig)):
            v = getattr(self, name)
            if isinstance(v, Mapping):
                try:
                    v = cls(**v)
                except TypeError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
                object.__setattr__(self, name, v)
            if not isinstance(v, cls):
                raise ConfigError(f"{name}={v!r}: must be a {cls.__name__} or a mapping")

    def to_dict(self) -> dict:
        return {
            "budgets": [b.to_dict() for b in self.budgets],
            "agent": self.agent,
            "episodes": self.episodes,
            "episodes_per_round": self.episodes_per_round,
            "reward": self.reward,
            "seed": self.seed,
            "actions": self.actions.to_dict(),
            "proxy": self.proxy.to_dict(),
            "ddpg": self.ddpg.to_dict(),
        }

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class SearchResult:
    """Best policy, every episode's record, the unpruned proxy accuracy and timings."""

    policy: Policy
    best: dict | None
    episodes: list[dict]
    baseline_accuracy: float
    wall_time_s: float
    space: dict
    resumed_episodes: int = 0

    @property
    def rewards(self) -> list[float]:
        return [e["reward"] for e in self.episodes]


def reward_of(kind: str, accuracy: float, macs: float) -> float:
    """AMC's rewards: ``-error`` or ``-error * log(MACs)``; ``error`` in [0, 1]."""
    error = 1.0 - accuracy / 100.0
    if kind == "error":
        return -error
    return -error * math.log(max(macs, 1.0))


def _read_log(path: Path) -> list[dict]:
    """Episodes of a previous run; a torn last line (interrupted write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line", path)
                break
            raise ConfigError(f"{path}: line {i + 1} is not JSON; cannot resume") from None
    # keep whole rounds only
    if rows:
        last = rows[-1]["round"]
        size = sum(r["round"] == last for r in rows)
        if size != rows[-1].get("round_size", size):
            rows = [r for r in rows if r["round"] != last]
    return rows


def _append(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _meta(config: SearchConfig, fingerprint: str, space: ActionSpace, baseline: float) -> dict:
    cfg = config.to_dict()
    cfg.pop("episodes")
    return {
        "config": cfg,
        "model": fingerprint,
        "units": [u.to_dict() for u in space.units],
        "baseline_accuracy": baseline,
    }


class SearchProblem(Protocol):
    """What a search needs from the thing being compressed (a model adapter such as
    :class:`nncompress.stages.search_model.ModelProblem`).

    Attributes
    ----------
    space : the :class:`~nncompress.policy.env.ActionSpace` (units, costs, budgets).
    fingerprint : identifies the model (and data) so that a resumed search can check it.
    shared : what every evaluation needs (the model, the held-out subset); an executor sends it
        to its workers once.
    evaluate_fn : a module-level function ``(shared, candidate) -> {"accuracy": %, "loss":
        ..., ...}`` (importable by name on a Ray worker).
    """

    space: ActionSpace
    fingerprint: str
    shared: Any
    evaluate_fn: Callable[[Any, Any], dict]

    def candidate(self, q: np.ndarray) -> Any:
        """Plain data describing the evaluation of the kept counts ``q``."""
        ...


def search(
    problem: SearchProblem,
    config: SearchConfig | None = None,
    *,
    executor: Executor | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> SearchResult:
    """Search a per-layer compression policy under ``config.budgets``.

    Parameters
    ----------
    problem : the model adapter (:class:`SearchProblem`), built with ``config``'s actions,
        budgets and proxy settings (:func:`nncompress.stages.search_model.search_model` builds
        it from a model and its data).
    config : :class:`SearchConfig`.
    executor : :class:`~nncompress.policy.executor.LocalExecutor` (default) or
        :class:`~nncompress.policy.executor.RayExecutor`; started and closed here.
    out_dir : where ``episodes.jsonl``, ``search.json`` and ``policy.json`` go; a folder with
        a previous run of the same search is resumed.
    progress : receives ``ProgressEvent("advance", "search", ...)`` per round with
        ``info={"best_reward", "best_accuracy", "episode"}``.

    Returns
    -------
    SearchResult : the best policy (highest reward among candidates that meet the budgets).
    """
    cfg = config or SearchConfig()
    t_start = time.perf_counter()
    space = problem.space
    if tuple(space.budgets) != tuple(cfg.budgets):
        raise ConfigError(
            f"budgets={[str(b) for b in cfg.budgets]}: the problem was built for "
            f"{[str(b) for b in space.budgets]}"
        )
    fingerprint = problem.fingerprint
    out = Path(out_dir) if out_dir is not None else None
    previous: list[dict] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        previous = _read_log(out / EPISODES_FILE)
        meta_path = out / META_FILE
        if previous and meta_path.is_file():
            old = json.loads(meta_path.read_text())
            cur = cfg.to_dict()
            cur.pop("episodes")
            if old.get("model") != fingerprint or old.get("config") != json.loads(json.dumps(cur)):
                raise ConfigError(
                    f"out_dir '{out}': holds a search of another model or configuration; "
                    "use another folder (or delete its episodes.jsonl to start over)"
                )
        elif previous:
            raise ConfigError(f"out_dir '{out}': episodes.jsonl without search.json; cannot resume")
    baseline = problem.evaluate_fn(problem.shared, problem.candidate(space.dense_q()))["accuracy"]
    agent = make_agent(cfg.agent, space, cfg.seed, cfg.ddpg)
    if isinstance(agent, GreedyAgent):
        agent.set_baseline(baseline)
    if out is not None:
        blob = json.dumps(_meta(cfg, fingerprint, space, baseline), indent=2, sort_keys=True)
        atomic_write(out / META_FILE, lambda tmp: tmp.write_text(blob + "\n"))
    episodes: list[dict] = []
    best: dict | None = None

    def better(row: dict) -> bool:
        return (
            row["tag"] != "scan"
            and row["feasible"]
            and (best is None or row["reward"] > best["reward"])
        )

    # ---- replay the log (resume) --------------------------------------------------------------
    n_round = 0
    i = 0
    while i < len(previous):
        rnd = [r for r in previous[i:] if r["round"] == previous[i]["round"]]
        props = agent.propose(len(rnd))
        if len(props) != len(rnd) or any(
            list(map(int, p.q)) != r["q"] for p, r in zip(props, rnd, strict=False)
        ):
            raise ConfigError(
                f"out_dir '{out}': episodes.jsonl does not match what this search proposes "
                f"(round {rnd[0]['round']}); it was written by another seed or version"
            )
        for p, r in zip(props, rnd, strict=True):
            p.info["accuracy"] = r["accuracy"]
        agent.observe(props, [r["reward"] for r in rnd])
        for r in rnd:
            episodes.append(r)
            if better(r):
                best = r
        i += len(rnd)
        n_round += 1
    resumed = len(episodes)
    total = agent.total(cfg.episodes)
    if progress:
        progress(ProgressEvent("start", "search", total=total, completed=resumed))
    own_executor = executor is None
    executor = executor or LocalExecutor()
    try:
        if len(episodes) < total:
            executor.start(problem.evaluate_fn, problem.shared)
        while len(episodes) < total:
            n = min(cfg.episodes_per_round, total - len(episodes))
            props = agent.propose(n)
            if not props:
                break
            t0 = time.perf_counter()
            results = executor.map([problem.candidate(p.q) for p in props])
            rows = []
            for p, res in zip(props, results, strict=True):
                p.info["accuracy"] = res["accuracy"]
                fr = space.fractions(p.q)
                costs = space.costs(p.q)
                row = {
                    "episode": len(episodes) + len(rows),
                    "round": n_round,
                    "round_size": len(props),
                    "agent": agent.name,
                    "tag": p.tag,
                    "actions": [float(a) for a in p.rollout.actions],
                    "q": [int(x) for x in p.q],
                    "accuracy": res["accuracy"],
                    "loss": res["loss"],
                    "refit_error": res["refit_error"],
                    "reward": reward_of(cfg.reward, res["accuracy"], costs["macs"]),
                    "fractions": fr,
                    "feasible": bool(space.feasible(p.q)),
                    "eval_s": res["wall_s"],
                    "round_s": time.perf_counter() - t0,
                }
                rows.append(row)
            agent.observe(props, [r["reward"] for r in rows])
            for r in rows:
                episodes.append(r)
                if better(r):
                    best = r
            if out is not None:
                _append(out / EPISODES_FILE, rows)
                if best is not None:
                    _policy_of(space, best, cfg, baseline).save(out / POLICY_FILE)
            n_round += 1
            if progress:
                progress(
                    ProgressEvent(
                        "advance",
                        "search",
                        total=total,
                        completed=len(episodes),
                        info={
                            "episode": len(episodes),
                            "best_reward": best["reward"] if best else None,
                            "best_accuracy": best["accuracy"] if best else None,
                        },
                    )
                )
    finally:
        if own_executor:
            executor.close()
        if progress:
            progress(ProgressEvent("end", "search"))
    if best is None:
        raise ConfigError("the search evaluated no candidate that meets the budgets")
    policy = _policy_of(space, best, cfg, baseline)
    if out is not None:
        policy.save(out / POLICY_FILE)
    return SearchResult(
        policy=policy,
        best=best,
        episodes=episodes,
        baseline_accuracy=baseline,
        wall_time_s=time.perf_counter() - t_start,
        space=space.describe(),
        resumed_episodes=resumed,
    )


def _policy_of(space: ActionSpace, row: dict, cfg: SearchConfig, baseline: float) -> Policy:
    info = {
        "agent": row["agent"],
        "episode": row["episode"],
        "reward": row["reward"],
        "proxy_accuracy": row["accuracy"],
        "baseline_proxy_accuracy": baseline,
        "budgets": [str(b) for b in cfg.budgets],
        "fractions": row["fractions"],
        "seed": cfg.seed,
    }
    return space.policy(np.asarray(row["q"], dtype=np.int64), info)
