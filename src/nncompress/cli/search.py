"""``nncompress search``: search a per-layer compression policy (AMC, He et al. 2018) under a
budget, locally or on Ray; writes DIR/policy.json and PNG plots. The recipe stage ``search``
runs the same code (:mod:`nncompress.stages.search`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    CheckpointJob,
    add_data_args,
    add_json_arg,
    add_model_arg,
    add_quiet_arg,
    out,
    print_json,
    print_table,
)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search per-layer compression ratios under a budget (AMC: DDPG, greedy, random)",
        description="Search per-layer ratios (filter pruning per coupled channel group, "
        "optionally connection sparsity and shared-weight bits) that meet --target, scoring "
        "candidates on the held-out split without fine-tuning (AMC). Writes DIR/policy.json "
        "(apply it with 'nncompress prune-filters --policy' or a recipe stage with "
        "allocate: policy), DIR/rewards.png, DIR/ratios.png and the resumable log "
        "DIR/episodes.jsonl (running the command again on DIR continues the search).",
    )
    add_model_arg(p)
    p.add_argument(
        "--target",
        required=True,
        help="budgets as fractions of the unpruned model: macs=0.5, params=0.3, bytes=0.1, "
        "latency=0.6 (batch 1) or latency@64=0.6; several separated by commas",
    )
    p.add_argument("--agent", default="ddpg", help="ddpg | greedy | random (default: ddpg)")
    p.add_argument("--episodes", type=int, default=300, help="candidates to evaluate (default 300)")
    p.add_argument("--warmup", type=int, default=100, help="DDPG random episodes (default 100)")
    p.add_argument(
        "--per-round", type=int, default=2, help="candidates per round, evaluated in parallel"
    )
    p.add_argument(
        "--actions",
        default="filter",
        help="what is searched: filter, sparsity or both ('filter,sparsity'); default filter",
    )
    p.add_argument("--bits", help="also search shared-weight bits among these, e.g. 2,3,4,5,8")
    p.add_argument(
        "--min-keep", type=float, default=0.2, help="smallest fraction of a group kept (0.2)"
    )
    p.add_argument(
        "--exclude", nargs="*", default=[], help="layer names (fnmatch patterns) not touched"
    )
    p.add_argument(
        "--reward", default="error", help="error (hard budget, default) | error_log_macs"
    )
    p.add_argument(
        "--val-samples", type=int, default=1000, help="held-out images of the proxy (1000)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--executor", default="local", help="local (default) | ray")
    p.add_argument(
        "--ray-address",
        help="join a Ray cluster: auto or HOST:PORT (default: start Ray on this machine)",
    )
    p.add_argument("--workers", type=int, help="Ray tasks in flight (default: Ray's CPUs)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_search)


def _stage_config(args: argparse.Namespace):
    """The ``search`` stage config a recipe would build, from the flags (validated before
    the checkpoint is even read)."""
    from ..core.errors import ConfigError
    from ..stages.search import SearchStageConfig

    kinds = [k.strip() for k in args.actions.split(",") if k.strip()]
    bad = sorted(set(kinds) - {"filter", "sparsity"})
    if bad or not kinds:
        raise ConfigError(f"--actions={args.actions!r}: give filter, sparsity or both")
    bits: tuple[int, ...] = ()
    if args.bits:
        try:
            bits = tuple(int(b) for b in args.bits.split(","))
        except ValueError:
            raise ConfigError(f"--bits={args.bits!r}: comma-separated integers") from None
    return SearchStageConfig(
        budgets=args.target,
        agent=args.agent,
        episodes=args.episodes,
        episodes_per_round=args.per_round,
        reward=args.reward,
        seed=args.seed,
        actions={
            "filter": "filter" in kinds,
            "sparsity": "sparsity" in kinds,
            "bits": bits,
            "min_keep": args.min_keep,
            "exclude": tuple(args.exclude),
        },
        proxy={"val_samples": args.val_samples},
        ddpg={"warmup": args.warmup},
        executor=args.executor,
        ray_address=args.ray_address,
        workers=args.workers,
    )


def cmd_search(args: argparse.Namespace) -> int:
    from ..stages.search import run_search, search_report

    cfg = _stage_config(args)
    job = CheckpointJob(args)
    ctx = job.context(args.out)
    result, files = run_search(ctx, cfg, args.out)
    report = search_report(result)
    report["files"] = {k: str(v) for k, v in files.items()}
    if args.json:
        print_json(report)
        return 0
    fr = report["fractions"] or {}
    print_table(
        f"best policy: episode {report['best_episode']} of {report['episodes']} "
        f"({result.policy.info.get('agent')}), proxy accuracy {report['proxy_accuracy']:.2f}% "
        f"(unpruned {report['baseline_proxy_accuracy']:.2f}%), "
        f"{report['search_wall_s']:.0f} s",
        ["name", "kept"],
        [[k, f"{100 * v:.1f}%"] for k, v in sorted(fr.items())],
    )
    pol = result.policy
    rows = [[n, "channels", f"{100 * (1 - r):.1f}%"] for n, r in pol.filter.items()]
    rows += [[n, "weights", f"{100 * (1 - s):.1f}%"] for n, s in pol.sparsity.items()]
    rows += [[n, "bits", str(b)] for n, b in pol.bits.items()]
    print_table("per-layer ratios", ["layer", "type", "kept"], rows)
    out.print(f"wrote {', '.join(str(v) for v in files.values())}")
    return 0
