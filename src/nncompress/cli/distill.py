"""``nncompress distill``: train a registry student from a teacher checkpoint (Hinton 2015)."""

from __future__ import annotations

import argparse

from .common import (
    RichProgress,
    add_data_args,
    add_json_arg,
    add_model_arg,
    add_quiet_arg,
    checkpoint_out,
    dataset_for,
    open_model,
    out,
    print_json,
    refuse_inapplicable,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="train a student model from a teacher checkpoint (knowledge distillation)",
        description="Train a registry student on the teacher's dataset with the loss "
        "alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE "
        "(Hinton et al. 2015); with --label-free the soft term alone, no labels. Reports "
        "teacher and student test accuracy and writes OUT (.safetensors) plus its sidecar.",
    )
    add_model_arg(p, "teacher", "teacher model: checkpoint (.safetensors) or .ncz file")
    p.add_argument(
        "--student", required=True, help="student registry name (see 'nncompress models')"
    )
    add_data_args(p)
    p.add_argument(
        "--temperature", type=float, default=4.0, help="softmax temperature T > 0 (default: 4)"
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.9,
        help="weight of the soft-target term in [0, 1]; 1 - alpha weighs the labels (default: 0.9)",
    )
    p.add_argument(
        "--label-free",
        action="store_true",
        help="soft targets only: never read the training labels",
    )
    p.add_argument("--epochs", type=int, default=10, help="number of epochs (default: 10)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default: 0.05)")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default: 128)")
    p.add_argument(
        "--weight-decay", type=float, default=1e-4, help="L2 penalty on weights (default: 1e-4)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--out", required=True, type=checkpoint_out, help="output student checkpoint (.safetensors)"
    )
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from ..distill import DistillConfig, distillation_loss
    from ..engine import (
        TrainConfig,
        config_to_dict,
        evaluate,
        fit,
        save_checkpoint,
        seed_everything,
    )
    from ..models import MODELS, create
    from .basic import _model_kwargs

    # validate everything before loading data or training
    refuse_inapplicable(
        args, {"alpha": (not args.label_free, "not with --label-free (soft targets only)")}
    )
    if args.student not in MODELS:
        raise ValueError(f"--student={args.student!r}: must be one of {sorted(MODELS)}")
    kd = DistillConfig(temperature=args.temperature, alpha=args.alpha, label_free=args.label_free)
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    teacher, sidecar = open_model(args.teacher, args)
    splits = dataset_for(sidecar, args.data_dir, args.dataset, args.teacher)
    progress = RichProgress(not args.quiet)
    teacher_test = evaluate(teacher, splits.loader("test", 512), progress=progress)
    kwargs = _model_kwargs(args.student, splits)
    seed_everything(cfg.seed)
    student = create(args.student, **kwargs)
    history = fit(
        student,
        splits.loader("train", cfg.batch_size, seed=cfg.seed),
        cfg,
        val_loader=splits.loader("val", 512),
        loss_fn=distillation_loss(teacher, kd),
        progress=progress,
    )
    test = evaluate(student, splits.loader("test", 512), progress=progress)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": history.last.get("val_accuracy"),
        "train_wall_time_s": history.wall_time_s,
        "teacher_test_accuracy": teacher_test["accuracy"],
    }
    save_checkpoint(
        student,
        args.out,
        model_name=args.student,
        model_kwargs=kwargs,
        dataset=splits.describe(),
        metrics=metrics,
        history=history.epochs,
        extra={
            "train_config": config_to_dict(cfg),
            "distill": {**config_to_dict(kd), "teacher": str(args.teacher)},
        },
    )
    if args.json:
        print_json({**metrics, "out": str(args.out)})
    else:
        out.print(
            f"teacher test accuracy {teacher_test['accuracy']:.2f}%  student "
            f"{test['accuracy']:.2f}%  ({history.wall_time_s:.1f} s)  -> {args.out}"
        )
    return 0
