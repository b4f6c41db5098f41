"""``nncompress prune-filters``: filter pruning with physical thinning (Li et al., ICLR 2017),
then retraining. ``nncompress prune --method filter-CRITERION`` runs the same code."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    CheckpointJob,
    add_data_args,
    add_json_arg,
    add_model_arg,
    add_quiet_arg,
    checkpoint_out,
    existing_file,
    out,
    print_json,
    print_table,
    refuse_inapplicable,
)
from .coverage import print_coverage

__all__ = ["filter_stage_config", "register", "run_filter_prune"]

CRITERIA = ("l1", "l2", "random", "largest")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune-filters",
        help="filter pruning with physical thinning (Li et al. 2017)",
        description="Remove whole filters of Conv/Linear layers (and everything coupled to "
        "them: BatchNorm, the next layers' inputs, residual partners), retrain, and write OUT "
        "(.safetensors): a smaller dense model. Prints params and MACs before and after and "
        "test accuracy. 'nncompress prune --method filter-CRITERION' is the same command.",
    )
    add_model_arg(p)
    p.add_argument(
        "--criterion", default="l1", choices=CRITERIA, help="filter ranking (default: l1)"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="fraction of each layer's filters to remove")
    g.add_argument("--macs-budget", type=float, help="fraction of the MACs to keep, in (0, 1]")
    g.add_argument(
        "--per-layer",
        help="per-layer ratios: 'conv1=0.5,layer1.0.conv1=0.3' or a JSON file {name: ratio}",
    )
    g.add_argument(
        "--policy",
        type=existing_file,
        help="per-layer ratios of a searched policy.json ('nncompress search')",
    )
    p.add_argument("--min-channels", type=int, default=1, help="channels every layer keeps")
    p.add_argument("--scope", default="layer", help="layer | global ranking (default: layer)")
    p.add_argument(
        "--exclude", nargs="*", default=[], help="layer names (fnmatch patterns) not to prune"
    )
    p.add_argument(
        "--retrain-epochs", type=int, default=0, help="retraining epochs (default 0: none)"
    )
    p.add_argument("--lr", type=float, help="base learning rate (default: the checkpoint's)")
    p.add_argument(
        "--lr-scale", type=float, default=0.1, help="retrain lr = lr-scale * base lr (default 0.1)"
    )
    p.add_argument(
        "--out", required=True, type=checkpoint_out, help="output checkpoint (.safetensors)"
    )
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_prune_filters)


def filter_stage_config(args: argparse.Namespace, criterion: str, per_layer: Any):
    """The ``filter_prune`` stage config a recipe would build, from the flags."""
    from ..stages.filter_prune import FilterPruneStageConfig

    policy = getattr(args, "policy", None)
    if policy is not None:
        return FilterPruneStageConfig(
            allocate="policy",
            policy_file=str(policy),
            exclude=tuple(args.exclude),
            epochs=args.retrain_epochs,
            lr_scale=args.lr_scale,
        )
    return FilterPruneStageConfig(
        criterion=criterion,
        ratio=args.ratio,
        per_layer=per_layer or None,
        macs_budget=args.macs_budget,
        scope=args.scope or "layer",
        min_channels=args.min_channels,
        exclude=tuple(args.exclude),
        epochs=args.retrain_epochs,
        lr_scale=args.lr_scale,
    )


def run_filter_prune(cfg, ctx) -> dict:
    """Run the ``filter_prune`` stage; the per-layer rows in the table format of the pruning
    commands (weights before -> after)."""
    from ..stages.filter_prune import run_filter_prune_stage

    report = run_filter_prune_stage(ctx, cfg)
    report["filter_layers"] = report.pop("layers")
    report["layers"] = {
        r["name"]: {
            "params": r["params_before"],
            "kept": r["params_after"],
            "kept_fraction": r["params_after"] / r["params_before"] if r["params_before"] else 1,
        }
        for r in report["filter_layers"]
    }
    report["params"] = report["params_after"]
    return report


def finish_pruning(job: CheckpointJob, args, report: dict, before: float, title: str) -> int:
    """Save the pruned model and print (or ``--json``) the report; shared by ``prune`` and
    ``prune-filters``."""
    report["test_accuracy_before"] = before
    after = report.get("test_accuracy")
    if after is None:
        after = report["test_accuracy"] = job.accuracy()
    metrics = {
        "test_accuracy": after,
        "test_accuracy_before": before,
        "nonzeros": report.get("nonzeros"),
        "params": report.get("params"),
    }
    pruning = {k: v for k, v in report.items() if k not in ("iterations", "agp")}
    job.save(job.model, args.out, metrics, job.extra("pruning", pruning))
    if args.json:
        print_json(report)
        return 0
    layers = report.get("layers", {})
    rows = [
        [n, r["params"], r["kept"], f"{100 * r['kept_fraction']:.1f}%"] for n, r in layers.items()
    ]
    print_table(title, ["layer", "weights", "kept", "kept %"], rows)
    _print_allocation(report)
    if "dead_neurons" in report:
        d = report["dead_neurons"]
        out.print(
            f"dead neurons removed: params {d['params_before']:,} -> {d['params_after']:,} "
            + ", ".join(
                f"{n}: {v['before']}->{v['after']}" for n, v in d["layers"].items() if "after" in v
            )
        )
    if "macs_before" in report:
        out.print(
            f"MACs {report['macs_before']:,} -> {report['macs_after']:,} "
            f"({100 * (1 - report['macs_kept']):.1f}% fewer), params "
            f"{report['params_before']:,} -> {report['params_after']:,} (physically thinned)"
        )
    if report.get("nonzeros"):
        out.print(
            f"nonzero parameters {report['nonzeros']:,} / {report['params']:,} "
            f"({report['compression']:.1f}x fewer)"
        )
    print_coverage(report.get("coverage"))
    out.print(f"test accuracy {before:.2f}% -> {after:.2f}%  -> {args.out}")
    return 0


def policy_rules(args: argparse.Namespace) -> dict[str, tuple[bool, str]]:
    """With ``--policy`` the ratios come from the policy: the ratio options do not apply;
    without retraining epochs neither do the learning-rate options."""
    free = getattr(args, "policy", None) is None
    when = "not with --policy (the policy sets every layer's ratio)"
    retrain = args.retrain_epochs > 0
    no_retrain = "only with --retrain-epochs > 0 (nothing is retrained)"
    return {
        "criterion": (free, when),
        "ratio": (free, when),
        "macs_budget": (free, when),
        "per_layer": (free, when),
        "min_channels": (free, when),
        "scope": (free, when),
        "lr": (retrain, no_retrain),
        "lr_scale": (retrain, no_retrain),
    }


def _print_allocation(report: dict) -> None:
    """The per-layer sparsities the allocation chose and the predicted drop."""
    alloc = report.get("allocation") or report.get("sensitivity")
    if alloc and alloc.get("per_layer"):
        how = (
            f"global magnitude ranking, floor {alloc['floor']:g} x kept fraction"
            if alloc.get("method") == "global"
            else "sensitivity analysis"
        )
        chosen = ", ".join(f"{n} {100 * v:.1f}%" for n, v in alloc["per_layer"].items())
        out.print(f"allocation ({how}): sparsity {chosen}", highlight=False)
    if alloc and alloc.get("predicted_drop") is not None:
        out.print(
            f"sensitivity-predicted drop (additive): {alloc['predicted_drop']:.2f} points",
            highlight=False,
        )
    pred = report.get("predicted")
    if pred:
        out.print(
            f"predicted drop: held-out {pred['val_accuracy']:.2f}% -> "
            f"{pred['val_accuracy_one_shot']:.2f}% pruned in one shot ({pred['drop']:.2f} "
            "points, before retraining)",
            highlight=False,
        )


def cmd_prune_filters(args: argparse.Namespace) -> int:
    from .prune import parse_per_layer

    refuse_inapplicable(args, policy_rules(args))
    per_layer = parse_per_layer(args.per_layer)
    cfg = filter_stage_config(args, args.criterion, per_layer)  # validated before loading
    job = CheckpointJob(args)
    cfg.check_model(job.model)  # --exclude / --per-layer names that match no layer
    before = job.accuracy()
    ctx = job.context(args.out.parent, job.train_config(lr=args.lr))
    report = run_filter_prune(cfg, ctx)
    job.model = ctx.model
    return finish_pruning(job, args, report, before, f"filter-{args.criterion} pruning")
