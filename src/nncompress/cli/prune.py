"""Pruning commands: ``prune`` (connection pruning; ``--method filter-*`` runs
``prune-filters``, :mod:`nncompress.cli.filters`) and ``sensitivity`` (per-layer sensitivity
curves)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
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

# connection pruning here, the 'filter-*' methods of 'nncompress prune-filters'
# (nncompress.cli.filters) with their flags
Runner = Callable[[Any, Any], dict]


def _connection_config(args: argparse.Namespace):
    """The ``prune`` stage config of ``--method magnitude|agp`` (validated before any work)."""
    from ..stages.prune import PruneStageConfig

    allocate = _allocation(args)
    per_layer = parse_per_layer(args.per_layer)
    nothing = args.q is None and args.sparsity is None and not per_layer
    if (
        nothing
        and allocate not in ("policy",)
        and not (allocate == "sensitivity" and args.max_drop)
    ):
        raise ValueError(
            "nothing to prune: give --sparsity S (a model-wide target, spread over layers by "
            "--allocate), --q Q (Han's per-layer threshold), --per-layer, --policy, or "
            "--allocate sensitivity --max-drop POINTS"
        )
    if args.sparsity == 0 and not per_layer:
        raise ValueError("--sparsity=0: prunes nothing; give a target in (0, 1)")
    return PruneStageConfig(
        method=args.method,
        q=args.q,
        sparsity=args.sparsity,
        scope=args.scope or "layer",
        per_layer=per_layer,
        exclude=tuple(args.exclude),
        allocate=allocate,
        floor=args.floor,
        policy_file=str(args.policy) if args.policy is not None else None,
        max_drop=args.max_drop,
        **(
            {"sensitivity_sparsities": tuple(_floats(args.sensitivities, "--sensitivities"))}
            if args.allocate_sensitivity
            else {}
        ),
        iterations=args.iterations,
        epochs=args.retrain_epochs,
        lr_scale=args.lr_scale,
        l1=args.l1,
        weight_decay=args.weight_decay,
        regularization_switch_epoch=args.l1_then_l2,
        adjust_dropout=not args.no_dropout_adjust,
        agp_frequency=args.agp_frequency,
        agp_initial_sparsity=args.agp_initial_sparsity,
        remove_dead=args.remove_dead,
        distill=_distill(args.distill),
    )


def _run_connection(cfg, ctx) -> dict:
    from ..stages.prune import run_prune_stage

    return run_prune_stage(ctx, cfg)


ALLOCATE = {"global": "global", "uniform": "none", "sensitivity": "sensitivity"}


def _allocation(args: argparse.Namespace) -> str:
    """The stage's ``allocate`` from ``--allocate`` / ``--allocate-sensitivity`` /
    ``--policy`` / ``--scope``: by default a model-wide ``--sparsity`` is spread by one global
    magnitude ranking with a per-layer floor."""
    chosen = args.allocate
    if args.allocate_sensitivity:
        if chosen not in (None, "sensitivity"):
            raise ValueError(f"--allocate-sensitivity and --allocate {chosen}: choose one")
        chosen = "sensitivity"
    if args.policy is not None:
        if chosen is not None:
            raise ValueError(f"--policy and --allocate {chosen}: choose one allocation")
        return "policy"
    if chosen is None:  # the default: global ranking, unless the flags say otherwise
        if args.sparsity is None or args.scope == "global":
            return "none"
        return "global"
    if args.scope == "global" and chosen != "uniform":
        raise ValueError(f"--scope global ranks without floors; it replaces --allocate {chosen}")
    if chosen == "global" and args.sparsity is None:
        raise ValueError("--allocate global spreads a model-wide --sparsity: give --sparsity")
    return ALLOCATE[chosen]


def _distill(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    values = _floats(text, "--distill")
    if len(values) != 2:
        raise ValueError(f"--distill={text!r}: expected TEMPERATURE,ALPHA (e.g. 4,0.7)")
    return {"temperature": values[0], "alpha": values[1]}


def _filter_config(args: argparse.Namespace):
    """``--method filter-CRITERION``: the ``prune-filters`` command with ``prune``'s flags
    (the connection-pruning flags it does not use are refused by :func:`_prune_rules`)."""
    from .filters import filter_stage_config

    per_layer = parse_per_layer(args.per_layer)
    if args.ratio is None and args.macs_budget is None and not per_layer and args.policy is None:
        raise ValueError(
            f"nothing to prune: --method {args.method} needs --ratio, --macs-budget, "
            "--per-layer or --policy"
        )
    return filter_stage_config(args, args.method.removeprefix("filter-"), per_layer)


def _run_filter(cfg, ctx) -> dict:
    from .filters import run_filter_prune

    return run_filter_prune(cfg, ctx)


def _prune_rules(args: argparse.Namespace) -> dict[str, tuple[bool, str]]:
    """Which options apply to this ``prune`` call (the others are refused, not ignored)."""
    m = args.method
    filt = m.startswith("filter-")
    retrain = args.retrain_epochs > 0
    sens = args.allocate_sensitivity or args.allocate == "sensitivity"
    glob = not filt and _allocation(args) == "global"
    no_retrain = "only with --retrain-epochs > 0 (nothing is retrained)"
    conn = (retrain and not filt, f"not with --method {m}" if filt else no_retrain)
    return {
        "q": (not filt, f"--method {m} takes --ratio or --macs-budget"),
        "sparsity": (not filt, f"--method {m} takes --ratio or --macs-budget"),
        "ratio": (filt, f"only with --method filter-* (got {m}); use --q or --sparsity"),
        "macs_budget": (filt, f"only with --method filter-* (got {m})"),
        "min_channels": (filt, f"only with --method filter-* (got {m})"),
        "iterations": (m == "magnitude", f"only with --method magnitude (got {m})"),
        "agp_frequency": (m == "agp", f"only with --method agp (got {m})"),
        "agp_initial_sparsity": (m == "agp", f"only with --method agp (got {m})"),
        "allocate_sensitivity": (not filt, f"not with --method {m}"),
        "allocate": (not filt, f"not with --method {m}"),
        "floor": (glob, "only with --allocate global (the default with --sparsity)"),
        "max_drop": (sens, "only with --allocate sensitivity (--allocate-sensitivity)"),
        "sensitivities": (sens, "only with --allocate sensitivity (--allocate-sensitivity)"),
        "remove_dead": (not filt, f"not with --method {m} (filters are removed physically)"),
        "no_dropout_adjust": conn,
        "distill": conn,
        "l1": conn,
        "weight_decay": conn,
        "l1_then_l2": (retrain and args.l1 is not None, "only with --l1 and --retrain-epochs > 0"),
        "lr": (retrain, no_retrain),
        "lr_scale": (retrain, no_retrain),
    }


# --method name -> (config from the flags, runner(config, ctx) returning the report)
METHODS: dict[str, tuple[Callable[[argparse.Namespace], Any], Runner]] = {
    "magnitude": (_connection_config, _run_connection),
    "agp": (_connection_config, _run_connection),
    "filter-l1": (_filter_config, _run_filter),
    "filter-l2": (_filter_config, _run_filter),
    "filter-random": (_filter_config, _run_filter),
    "filter-largest": (_filter_config, _run_filter),
}


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{flag}={text!r}: must be comma-separated numbers") from exc


def parse_per_layer(text: str | None) -> dict[str, Any]:
    """``fc1=0.9,fc2=0.8`` or a JSON file (``{name: sparsity}``, or a sensitivity output's
    ``per_layer.json``)."""
    if not text:
        return {}
    path = Path(text)
    if path.is_file():
        data = json.loads(path.read_text())
        data = data.get("per_layer", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ValueError(f"--per-layer={text!r}: the JSON file must hold a mapping")
        return data
    out_map: dict[str, Any] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--per-layer={text!r}: expected name=value[,name=value] or a file")
        try:
            out_map[name.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"--per-layer: value {value!r} for {name!r} is not a number") from exc
    return out_map


def register(sub: argparse._SubParsersAction) -> None:
    _add_prune(sub)
    _add_sensitivity(sub)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a checkpoint: connection pruning (magnitude, agp) or filter pruning "
        "(filter-l1, ...)",
        description="Prune a checkpoint and retrain it. Connection pruning (Han et al. 2015): "
        "a model-wide --sparsity spread over layers by one global magnitude ranking with a "
        "per-layer floor (or uniformly, or by sensitivity), or Han's threshold q x std per "
        "layer; iterative prune -> retrain or gradual AGP (Zhu & Gupta 2017). Filter pruning "
        "with physical thinning (Li et al. 2017): --method filter-l1|l2|random|largest with "
        "--ratio or --macs-budget, the same as 'nncompress prune-filters'. Prints the chosen "
        "per-layer sparsities, the predicted drop (held-out, one-shot, before retraining), "
        "per-layer kept % and test accuracy before and after, and writes OUT (.safetensors) "
        "with its JSON sidecar.",
    )
    add_model_arg(p)
    p.add_argument(
        "--method",
        default="magnitude",
        help="magnitude | agp | filter-l1 | filter-l2 | filter-random | filter-largest "
        "(default: magnitude; filter-* is 'nncompress prune-filters')",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--q", type=float, help="Han's quality parameter: prune |w| <= q * std(layer)")
    g.add_argument("--sparsity", type=float, help="fraction of weights to remove, in [0, 1)")
    g.add_argument(
        "--ratio", type=float, help="filter-*: fraction of each layer's filters to remove"
    )
    g.add_argument(
        "--macs-budget", type=float, help="filter-*: fraction of the MACs to keep, in (0, 1]"
    )
    p.add_argument(
        "--min-channels", type=int, default=1, help="filter-*: channels every layer keeps"
    )
    p.add_argument(
        "--allocate",
        choices=sorted(ALLOCATE),
        default=None,
        help="how a model-wide --sparsity is spread over layers: global = one magnitude "
        "ranking of all layers with a per-layer floor (default with --sparsity), uniform = "
        "every layer pruned to --sparsity, sensitivity = from a held-out sensitivity scan",
    )
    p.add_argument(
        "--floor",
        type=float,
        default=0.3,
        help="--allocate global: every layer keeps at least FLOOR x (1 - sparsity) of its weights",
    )
    p.add_argument(
        "--scope",
        default=None,
        help="layer | global: global ranks all layers without floors (Han's --q is per "
        "layer) (default: layer)",
    )
    p.add_argument(
        "--per-layer",
        help="per-layer overrides: 'fc1=0.9,fc2=0.8' or a JSON file {name: value} "
        "(e.g. per_layer.json written by 'nncompress sensitivity')",
    )
    p.add_argument(
        "--exclude", nargs="*", default=[], help="layer names (fnmatch patterns) not to prune"
    )
    p.add_argument(
        "--allocate-sensitivity",
        action="store_true",
        help="the same as --allocate sensitivity: per-layer sparsities from a sensitivity "
        "analysis on the held-out split (within --max-drop, or the smallest drop reaching "
        "--sparsity overall)",
    )
    p.add_argument("--max-drop", type=float, help="tolerated accuracy drop in points")
    p.add_argument(
        "--policy",
        type=existing_file,
        help="per-layer sparsities (magnitude) or filter ratios (filter-*) of a searched "
        "policy.json ('nncompress search')",
    )
    p.add_argument(
        "--sensitivities",
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,0.97,0.98",
        help="sparsity grid of --allocate-sensitivity",
    )
    p.add_argument("--iterations", type=int, default=1, help="prune -> retrain cycles (default 1)")
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=0,
        help="retraining epochs per iteration (agp: total epochs); 0 = one-shot (default 0)",
    )
    p.add_argument("--lr", type=float, help="base learning rate (default: the checkpoint's)")
    p.add_argument(
        "--lr-scale", type=float, default=0.1, help="retrain lr = lr-scale * base lr (default 0.1)"
    )
    p.add_argument("--l1", type=float, help="L1 strength while retraining")
    p.add_argument("--weight-decay", type=float, help="L2 strength while retraining")
    p.add_argument(
        "--l1-then-l2",
        type=int,
        metavar="EPOCH",
        help="use L1 until this retraining epoch, then L2 (Han 2015)",
    )
    p.add_argument(
        "--no-dropout-adjust",
        action="store_true",
        help="keep dropout rates (default: D_r = D_o sqrt(C_r / C_o) while retraining)",
    )
    p.add_argument("--agp-frequency", type=int, default=100, help="AGP: steps between updates")
    p.add_argument(
        "--agp-initial-sparsity", type=float, default=0.0, help="AGP: initial sparsity s_i"
    )
    p.add_argument(
        "--remove-dead", action="store_true", help="physically remove dead neurons at the end"
    )
    p.add_argument(
        "--distill",
        metavar="T,ALPHA",
        help="retrain with knowledge distillation from the unpruned model (e.g. 4,0.7)",
    )
    p.add_argument(
        "--out", required=True, type=checkpoint_out, help="output checkpoint (.safetensors)"
    )
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_prune)


def _add_sensitivity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="per-layer pruning sensitivity curves (JSON + PNG)",
        description="Prune one layer at a time over a grid of sparsities (no retraining), "
        "evaluate on the held-out split, and write DIR/sensitivity.json, DIR/sensitivity.png "
        "and DIR/per_layer.json (the largest sparsity per layer within --max-drop points).",
    )
    add_model_arg(p)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--sparsities",
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95",
        help="comma-separated sparsities (default 0.1..0.9, 0.95)",
    )
    p.add_argument(
        "--max-drop", type=float, default=1.0, help="tolerated drop in points (default 1.0)"
    )
    p.add_argument(
        "--val-batches", type=int, help="evaluate on this many held-out batches of 512 only"
    )
    p.add_argument("--exclude", nargs="*", default=[], help="layer names (patterns) to skip")
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_sensitivity)


def cmd_prune(args: argparse.Namespace) -> int:
    from .filters import finish_pruning, policy_rules

    if args.method not in METHODS:
        raise ValueError(f"--method={args.method!r}: must be one of {sorted(METHODS)}")
    refuse_inapplicable(args, _prune_rules(args))
    if args.method.startswith("filter-"):
        refuse_inapplicable(args, policy_rules(args))
    build, run = METHODS[args.method]
    cfg = build(args)  # every option validated before anything is loaded
    job = CheckpointJob(args)
    cfg.check_model(job.model)  # --exclude / --per-layer names that match no layer
    before = job.accuracy()
    ctx = job.context(args.out.parent, job.train_config(lr=args.lr))
    report = run(cfg, ctx)
    job.model = ctx.model
    return finish_pruning(job, args, report, before, f"{args.method} pruning")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from ..core.files import atomic_write_json
    from ..core.select import unmatched
    from ..prune.sensitivity import (
        sensitivity_analysis,
        thresholds_from_sensitivity,
        write_sensitivity,
    )

    grid = _floats(args.sparsities, "--sparsities")
    if not grid or not all(0 < s < 1 for s in grid):
        raise ValueError(f"--sparsities={args.sparsities!r}: must be numbers in (0, 1)")
    if args.max_drop < 0:
        raise ValueError(f"--max-drop={args.max_drop}: must be >= 0")
    if args.val_batches is not None and args.val_batches < 1:
        raise ValueError(f"--val-batches={args.val_batches}: must be >= 1")
    job = CheckpointJob(args)
    bad = unmatched(args.exclude, job.model)
    if bad:
        raise ValueError(f"--exclude={bad}: matches no layer of the model")
    res = sensitivity_analysis(
        job.model,
        job.splits.loader("val", 512),
        grid,
        exclude=tuple(args.exclude),
        max_batches=args.val_batches,
        progress=job.progress,
    )
    files = write_sensitivity(res, args.out, title=f"{Path(args.checkpoint).name} sensitivity")
    per = thresholds_from_sensitivity(res, args.max_drop)
    per_path = args.out / "per_layer.json"
    atomic_write_json(per_path, {"max_drop": args.max_drop, "per_layer": per}, indent=2)
    if args.json:
        print_json(
            {**res.to_dict(), "per_layer": per, "files": {k: str(v) for k, v in files.items()}}
        )
        return 0
    headers = ["layer", "weights", *[f"{100 * s:g}%" for s in res.sparsities], "chosen"]
    rows = [
        [n, res.params[n], *[f"{a:.2f}" for a in accs], f"{100 * per[n]:g}%"]
        for n, accs in res.curves.items()
    ]
    print_table(f"held-out accuracy (baseline {res.baseline:.2f}%)", headers, rows)
    out.print(f"wrote {files['json']}, {files['png']}, {per_path}")
    return 0
