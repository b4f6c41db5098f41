"""``nncompress decompose``: low-rank factorisation of a checkpoint's layers, then fine-tuning."""

from __future__ import annotations

import argparse

from .common import (
    CheckpointJob,
    add_data_args,
    add_json_arg,
    add_model_arg,
    add_quiet_arg,
    checkpoint_out,
    out,
    print_json,
    print_table,
    refuse_inapplicable,
)
from .coverage import print_coverage


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decompose",
        help="low-rank decomposition (svd, separable, tucker2, cp, tt) + fine-tuning",
        description="Replace Linear/Conv layers of a checkpoint by low-rank factors "
        "(truncated SVD, Jaderberg separable, Tucker-2, CP, tensor-train), optionally "
        "fine-tune (by distillation from the original by default), print per-layer ranks, "
        "params and MACs before/after and test accuracy before/after, and save the result.",
    )
    add_model_arg(p)
    p.add_argument(
        "--method", required=True, help="svd | separable | tucker2 | cp | tt (see docs/lowrank.md)"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="fixed rank (tucker2: both channel ranks)")
    g.add_argument("--energy", type=float, help="fraction of squared singular values kept")
    g.add_argument(
        "--rank-fraction",
        type=float,
        help="largest rank keeping this fraction of each layer's params",
    )
    g.add_argument("--vbmf", action="store_true", help="ranks by EVBMF (Nakajima et al. 2013)")
    g.add_argument(
        "--macs-budget", type=float, help="keep this fraction of the targeted layers' MACs"
    )
    g.add_argument(
        "--params-budget", type=float, help="keep this fraction of the targeted layers' params"
    )
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="layer names or fnmatch patterns (default: every layer the method supports)",
    )
    p.add_argument(
        "--include-classifier",
        action="store_true",
        help="also decompose the output layer (kept whole by default unless --layers names it)",
    )
    p.add_argument(
        "--allocate",
        default="auto",
        choices=["auto", "response", "energy"],
        help="how --params-budget / --macs-budget is spread: response = ranks minimising the "
        "summed relative response error on training batches (svd, separable), energy = one "
        "singular-value energy shared by all layers, auto = response where possible",
    )
    p.add_argument("--min-rank", type=int, default=1, help="lower bound on ranks (default: 1)")
    p.add_argument("--tt-cores", type=int, default=3, help="tt: number of cores (default: 3)")
    p.add_argument(
        "--allow-more-macs",
        action="store_true",
        help="decompose a layer if it saves params even when it costs more MACs (tt)",
    )
    p.add_argument(
        "--refit-batches",
        type=int,
        default=16,
        help="training batches for the least-squares refit of each decomposed block's last "
        "factors to the original layer's response (0: off; default: 16)",
    )
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs (default: 0)")
    p.add_argument(
        "--restore-best",
        action="store_true",
        help="end fine-tuning on the epoch (0 = before it) with the best held-out accuracy",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="base learning rate (default: the checkpoint's)"
    )
    p.add_argument(
        "--lr-scale", type=float, default=0.1, help="fine-tuning lr = lr * this (default: 0.1)"
    )
    p.add_argument(
        "--no-distill",
        action="store_true",
        help="fine-tune with cross-entropy instead of distillation from the original",
    )
    p.add_argument("--augment", action="store_true", help="random shifts while fine-tuning")
    p.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch size")
    p.add_argument(
        "--out", required=True, type=checkpoint_out, help="output checkpoint (.safetensors)"
    )
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_decompose)


def cmd_decompose(args: argparse.Namespace) -> int:
    from ..stages.decompose import DecomposeStageConfig, decompose_and_finetune

    tune = args.finetune_epochs > 0
    no_tune = "only with --finetune-epochs > 0 (nothing is fine-tuned)"
    refuse_inapplicable(
        args,
        {
            "tt_cores": (args.method == "tt", f"only with --method tt (got {args.method})"),
            "restore_best": (tune, no_tune),
            "lr": (tune, no_tune),
            "lr_scale": (tune, no_tune),
            "no_distill": (tune, no_tune),
            "augment": (tune, no_tune),
            "batch_size": (tune, no_tune),
        },
    )
    # the same stage config a recipe's {stage: decompose, ...} builds
    stage = DecomposeStageConfig(
        method=args.method,
        rank=args.rank,
        energy=args.energy,
        rank_fraction=args.rank_fraction,
        vbmf=args.vbmf,
        macs_budget=args.macs_budget,
        params_budget=args.params_budget,
        min_rank=args.min_rank,
        tt_cores=args.tt_cores,
        require_fewer_macs=not args.allow_more_macs,
        layers=tuple(args.layers) if args.layers else None,
        keep_classifier=not args.include_classifier,
        allocate=args.allocate,
        refit_batches=args.refit_batches,
        finetune_epochs=args.finetune_epochs,
        lr_scale=args.lr_scale,
        distill=not args.no_distill,
    )
    job = CheckpointJob(args)
    stage.check_model(job.model)  # --layers that match no layer of the model
    base = job.train_config()
    tcfg = job.train_config(
        augment=args.augment or base.augment,
        restore_best=True if args.restore_best else None,
        lr=args.lr,
        batch_size=args.batch_size,
    )
    model = job.model
    before = job.accuracy()
    report, info = decompose_and_finetune(model, job.splits, stage, tcfg, progress=job.progress)
    after = job.accuracy()
    extra = {**report.to_dict(), "finetune": info, "stage": stage.to_dict()}
    job.save(
        model,
        args.out,
        {"test_accuracy": after, "test_accuracy_before_decompose": before},
        job.extra("decompose", extra),
    )
    result = {
        **report.to_dict(),
        "finetune": info,
        "test_accuracy_before": before,
        "test_accuracy_after": after,
        "out": str(args.out),
    }
    if args.json:
        print_json(result)
        return 0
    rows = []
    for x in report.layers:
        rows.append(
            [
                x.name,
                x.status,
                "x".join(map(str, x.rank)) if x.rank else "",
                x.params_before,
                x.params_after,
                x.macs_before if x.macs_before is not None else "",
                x.macs_after if x.macs_after is not None else "",
                x.rel_error if x.rel_error is not None else "",
            ]
        )
    rows.append(
        [
            "total",
            f"{len(report.decomposed)} decomposed",
            "",
            report.params_before,
            report.params_after,
            report.macs_before if report.macs_before is not None else "",
            report.macs_after if report.macs_after is not None else "",
            "",
        ]
    )
    print_table(
        f"decompose --method {args.method}",
        ["layer", "status", "rank", "params", "params after", "MACs", "MACs after", "rel. err"],
        rows,
    )
    for x in report.layers:
        if x.reason:
            out.print(f"{x.name}: skipped ({x.reason})", highlight=False)
    print_coverage(report.coverage.to_dict(), details=False)  # reasons printed above
    if info.get("classifier_kept"):
        out.print(
            f"{info['classifier_kept']}: kept whole (the output layer; --include-classifier "
            "or --layers to decompose it)",
            highlight=False,
        )
    if report.allocation == "response":
        out.print(
            f"budget: ranks by response error per parameter (allocate=response), met: "
            f"{report.budget_met}",
            highlight=False,
        )
    elif report.knob is not None:
        out.print(f"budget: global knob {report.knob:.4g}, met: {report.budget_met}")
    for r in info.get("refit", []):
        out.print(
            f"{r['name']}: refit response error {r['error_before']:.4f} -> {r['error_after']:.4f}",
            highlight=False,
        )
    if info["finetune_epochs"]:
        tail = f" after {info['finetune_epochs']} fine-tuning epochs"
    else:
        tail = " (no fine-tuning: --finetune-epochs N recovers more)"
    out.print(f"test accuracy {before:.2f}% -> {after:.2f}%{tail}  -> {args.out}")
    return 0
