"""Recipe stage ``search``: search a per-layer compression policy (AMC, He et al. 2018) whose
ratios the next ``filter_prune`` / ``prune`` / ``share`` stage uses.

Registered in :data:`nncompress.stages.registry.STAGES` as ``"search"``. The
``nncompress search`` command runs the same code.

Recipe example (ResNet-20 at half the MACs, then the searched filter pruning)::

    - {stage: search, budgets: "macs=0.5", agent: ddpg, episodes: 160,
       ddpg: {warmup: 60}, executor: local}
    - {stage: filter_prune, allocate: policy, epochs: 2, lr_scale: 0.2}

The stage does not change the model. It writes ``search/`` in the run folder
(``policy.json``, ``episodes.jsonl``, ``search.json``, ``rewards.png``, ``ratios.png``); a
resumed recipe continues the search from ``episodes.jsonl``. A later stage with
``allocate: policy`` reads the policy of the last ``search`` stage (or ``policy_file``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.policy import Policy
from ..core.validate import check, is_int
from ..policy.executor import EXECUTORS, make_executor
from ..policy.plots import plot_ratios, plot_rewards
from ..policy.search import SearchConfig, SearchResult
from .base import StageConfig, StageContext, stage_config
from .search_model import search_model

__all__ = ["SearchStageConfig", "run_search_stage", "stage_policy", "write_search_outputs"]

log = logging.getLogger(__name__)

POLICY_ARTIFACT = "policy"


@stage_config(SearchConfig)
class SearchStageConfig(StageConfig):
    """Configuration of the ``search`` stage.

    Attributes
    ----------
    budgets, agent, episodes, episodes_per_round, reward, seed, actions, proxy, ddpg : the
        :class:`~nncompress.policy.SearchConfig` (``actions``, ``proxy`` and ``ddpg`` as
        mappings of :class:`~nncompress.policy.ActionsConfig`,
        :class:`~nncompress.policy.ProxyConfig`, :class:`~nncompress.policy.DDPGConfig`).
    executor : ``local`` or ``ray``.
    ray_address : ``None`` (a local Ray on this machine), ``auto`` or ``HOST:PORT`` of a
        running cluster (``ray start --head``); executor ``ray`` only.
    workers : Ray tasks in flight (default: the CPUs Ray sees).
    """

    executor: str = "local"
    ray_address: str | None = None
    workers: int | None = None

    def _check_options(self) -> None:
        check(self.executor in EXECUTORS, "executor", self.executor, f"must be one of {EXECUTORS}")
        if self.ray_address is not None:
            check(
                self.executor == "ray" and isinstance(self.ray_address, str),
                "ray_address",
                self.ray_address,
                "only applies to executor='ray' ('auto' or HOST:PORT)",
            )
        w = self.workers
        check(w is None or (is_int(w) and w >= 1), "workers", w, "must be an integer >= 1")


def write_search_outputs(result: SearchResult, out_dir: Path, title: str = "") -> dict[str, Path]:
    """``rewards.png`` and ``ratios.png`` beside the search's ``policy.json``."""
    return {
        "policy": out_dir / "policy.json",
        "rewards": plot_rewards(result.episodes, out_dir / "rewards.png", title),
        "ratios": plot_ratios(result.policy, out_dir / "ratios.png", title),
    }


def search_report(result: SearchResult) -> dict[str, Any]:
    """The JSON-able summary a stage or the CLI reports."""
    best = result.best or {}
    return {
        "policy": result.policy.to_dict(),
        "best_episode": best.get("episode"),
        "best_reward": best.get("reward"),
        "proxy_accuracy": best.get("accuracy"),
        "baseline_proxy_accuracy": result.baseline_accuracy,
        "fractions": best.get("fractions"),
        "episodes": len(result.episodes),
        "resumed_episodes": result.resumed_episodes,
        "search_wall_s": result.wall_time_s,
        "units": len(result.space["units"]),
    }


def run_search(
    ctx: StageContext, config: SearchStageConfig, out_dir: Path
) -> tuple[SearchResult, dict]:
    """Search on ``ctx.model`` (unchanged) with the stage's executor; write the outputs."""
    executor = make_executor(config.executor, config.ray_address, config.workers)
    with executor:
        executor.connect()  # Ray missing or an address that does not answer: fail now
        result = search_model(
            ctx.model,
            ctx.splits.train,
            ctx.splits.val,
            config.algorithm,
            executor=executor,
            out_dir=out_dir,
            progress=ctx.progress,
        )
    files = write_search_outputs(result, out_dir)
    return result, files


def run_search_stage(ctx: StageContext, config: SearchStageConfig) -> dict[str, Any]:
    """Search a policy (``ctx.model`` is not changed) and record it for the next stages."""
    out_dir = ctx.out_dir / "search"
    result, files = run_search(ctx, config, out_dir)
    ctx.artifacts[POLICY_ARTIFACT] = files["policy"]
    report = search_report(result)
    report["files"] = {k: str(v) for k, v in files.items()}
    return report


def stage_policy(ctx: StageContext, policy_file: str | None, stage: str) -> Policy:
    """The policy a stage with ``allocate: policy`` applies: ``policy_file`` if given, else
    the one the last ``search`` stage of the recipe wrote."""
    if policy_file is not None:
        return Policy.load(policy_file)
    path = ctx.artifacts.get(POLICY_ARTIFACT)
    if path is None:
        raise ConfigError(
            f"{stage}: allocate='policy' needs a 'search' stage before it, or policy_file=PATH"
        )
    return Policy.load(path)
