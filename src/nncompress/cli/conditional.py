"""``nncompress early-exit`` and ``nncompress cascade``: conditional computation (easy inputs
leave early), plus what ``eval`` and ``stats`` print for exit models and cascades."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    CheckpointJob,
    RichProgress,
    add_data_args,
    add_json_arg,
    add_quiet_arg,
    checkpoint_out,
    dataset_for,
    existing_file,
    out,
    print_json,
    print_table,
)


def _comma_list(value: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in value.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"'{value}': give comma-separated module names")
    return names


def _floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}': give comma-separated numbers") from None


def _json_out(value: str) -> Path:
    path = Path(value)
    if path.suffix != ".json":
        raise argparse.ArgumentTypeError(f"'{value}' must end in .json")
    return path


def _add_calibration_args(p: argparse.ArgumentParser, max_loss: float) -> None:
    p.add_argument(
        "--max-loss",
        type=float,
        default=max_loss,
        help=f"accuracy points the exits may lose on the held-out split (default: {max_loss})",
    )
    p.add_argument(
        "--method",
        default="exact",
        help="threshold search: exact (optimum over held-out confidences) or greedy",
    )
    p.add_argument(
        "--confidence", default="max-softmax", help="max-softmax or entropy (default: max-softmax)"
    )
    p.add_argument("--grid", type=int, default=None, help="exact: candidate thresholds per exit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "early-exit",
        help="attach exit heads, train them, calibrate thresholds (BranchyNet / Bolukbasi)",
        description="Attach small classifier heads after named blocks of a checkpoint's model, "
        "train them (heads only on the frozen model, or jointly), choose per-exit confidence "
        "thresholds on the held-out split that minimise the expected MACs within --max-loss "
        "points, print the exit histogram on held-out and test data, and save the exit model.",
    )
    p.add_argument("checkpoint", type=existing_file, help="checkpoint (.safetensors)")
    p.add_argument(
        "--after",
        type=_comma_list,
        required=True,
        help="exit points: module names in forward order, e.g. layer1,layer2",
    )
    p.add_argument("--head", default="pool-linear", help="pool-linear or conv-pool-linear")
    p.add_argument("--head-channels", type=int, default=None, help="conv head width (default 2C)")
    p.add_argument("--head-stride", type=int, default=2, help="conv head stride (default: 2)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs of the exits")
    p.add_argument(
        "--lr-scale", type=float, default=0.5, help="lr = checkpoint's lr * this (default 0.5)"
    )
    p.add_argument("--mode", default="heads", help="heads (frozen model) or joint (BranchyNet)")
    p.add_argument(
        "--weights", type=_floats, default=None, help="joint loss weights, one per exit + final"
    )
    p.add_argument(
        "--no-distill", action="store_true", help="train exits on labels only (no KD from final)"
    )
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature (default 4)")
    p.add_argument("--alpha", type=float, default=0.5, help="KD soft-target weight (default 0.5)")
    _add_calibration_args(p, 0.5)
    p.add_argument("--out", required=True, type=checkpoint_out, help="output (.safetensors)")
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_early_exit)

    p = sub.add_parser(
        "cascade",
        help="calibrate a cascade of checkpoints, cheapest first",
        description="Run a small model first and larger ones only where it is not confident: "
        "choose the thresholds on the held-out split that minimise the expected MACs within "
        "--max-loss points of the last model, and print the held-out and test reports.",
    )
    p.add_argument(
        "checkpoints", nargs="+", type=existing_file, help="2+ checkpoints, cheapest first"
    )
    _add_calibration_args(p, 0.3)
    p.add_argument(
        "--out", type=_json_out, default=None, help="write the calibrated cascade (.json manifest)"
    )
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_cascade)


def print_exit_report(title: str, report) -> None:
    """The per-exit table and summary of an :class:`~nncompress.conditional.ExitReport`."""
    print_table(title, *report.rows())
    out.print(report.summary(), highlight=False)


def cmd_early_exit(args: argparse.Namespace) -> int:
    from ..conditional import ConditionalModel, evaluate_exits
    from ..stages.conditional import EarlyExitStageConfig, attach_train_calibrate

    # the same stage config a recipe's {stage: early_exit, ...} builds: errors before work
    stage = EarlyExitStageConfig(
        after=args.after,
        head=args.head,
        head_channels=args.head_channels,
        head_stride=args.head_stride,
        confidence=args.confidence,
        epochs=args.epochs,
        lr_scale=args.lr_scale,
        mode=args.mode,
        weights=args.weights,
        distill=not args.no_distill,
        temperature=args.temperature,
        alpha=args.alpha,
        max_loss=args.max_loss,
        method=args.method,
        grid=args.grid,
    )
    job = CheckpointJob(args)
    if isinstance(job.model, ConditionalModel):
        raise ValueError(f"'{args.checkpoint}' already has exits; start from the plain model")
    before = job.accuracy()
    net, history, held_out = attach_train_calibrate(
        job.model, job.splits, stage, job.train_config(), progress=job.progress
    )
    shape = job.splits.input_shape
    test = evaluate_exits(
        net,
        job.splits.loader("test", 512),
        input_shape=shape,
        reference=False,
        progress=job.progress,
    )
    info = {
        "stage": stage.to_dict(),
        "held_out": held_out.to_dict(),
        "test": test.to_dict(),
        "train_wall_time_s": history.wall_time_s if history else 0.0,
    }
    job.save(
        net,
        args.out,
        {
            "test_accuracy": test.accuracy,
            "test_accuracy_before_exits": before,
            "expected_macs_test": test.expected_macs,
            "macs_full": test.full_macs,
        },
        job.extra("early_exit", info),
    )
    result = {**info, "test_accuracy_before": before, "out": str(args.out)}
    if args.json:
        print_json(result)
        return 0
    print_exit_report(f"held-out split (thresholds chosen here, <= {args.max_loss} pts)", held_out)
    print_exit_report("test split", test)
    out.print(f"test accuracy without exits {before:.2f}% -> with exits {test.accuracy:.2f}%")
    out.print(f"saved {args.out}")
    return 0


def _load_members(paths: list[Path], data_dir: str | None) -> tuple[list, Any, list[dict]]:
    from ..engine import load_checkpoint

    models, sidecars = [], []
    for p in paths:
        model, side = load_checkpoint(p)
        models.append(model.eval())
        sidecars.append(side)
    names = [(s.get("dataset") or {}).get("name") for s in sidecars]
    if len(set(names)) != 1:
        listed = ", ".join(f"{p.name}: {n}" for p, n in zip(paths, names, strict=True))
        raise ValueError(f"checkpoints: a cascade needs one dataset; got {listed}")
    return models, dataset_for(sidecars[0], data_dir), sidecars


def cmd_cascade(args: argparse.Namespace) -> int:
    from ..conditional import CalibrationConfig, Cascade, calibrate_, evaluate_exits, save_cascade

    if len(args.checkpoints) < 2:
        raise ValueError(f"checkpoints: a cascade needs at least 2, got {len(args.checkpoints)}")
    config = CalibrationConfig(
        max_loss=args.max_loss, method=args.method, confidence=args.confidence, grid=args.grid
    )
    models, splits, _ = _load_members(args.checkpoints, args.data_dir)
    shape = splits.input_shape
    cascade = Cascade(models, input_shape=shape)  # class counts checked before any work
    progress = RichProgress(not args.quiet)
    held_out = calibrate_(
        cascade, splits.loader("val", 512), config, input_shape=shape, progress=progress
    )
    test = evaluate_exits(cascade, splits.loader("test", 512), input_shape=shape, progress=progress)
    if args.out is not None:
        save_cascade(cascade, args.out, args.checkpoints)
    result = {
        "members": [str(p) for p in args.checkpoints],
        "held_out": held_out.to_dict(),
        "test": test.to_dict(),
        "out": str(args.out) if args.out else None,
    }
    if args.json:
        print_json(result)
        return 0
    print_exit_report(f"held-out split (thresholds chosen here, <= {args.max_loss} pts)", held_out)
    print_exit_report("test split", test)
    if args.out is not None:
        out.print(f"saved {args.out}")
    return 0


def cmd_eval_conditional(args: argparse.Namespace, model, splits) -> int:
    """``nncompress eval`` of an exit model or cascade: accuracy as deployed (samples leave
    early), the exit histogram, the full model's accuracy and the expected MACs."""
    from ..conditional import evaluate_exits

    report = evaluate_exits(
        model,
        splits.loader(args.split, 512),
        input_shape=splits.input_shape,
        progress=RichProgress(not args.quiet),
    )
    if args.json:
        print_json({"split": args.split, "accuracy": report.accuracy, "exits": report.to_dict()})
        return 0
    print_exit_report(f"{args.split} split", report)
    return 0


def load_for_eval(path: Path, data_dir: str | None):
    """A cascade manifest (``.json``): ``(cascade, splits)`` for ``nncompress eval``."""
    from ..conditional import load_cascade
    from ..engine import read_sidecar

    cascade, manifest = load_cascade(path)
    first = Path(manifest["members"][0]["path"])
    first = first if first.is_absolute() else path.parent / first
    return cascade, dataset_for(read_sidecar(first), data_dir)
