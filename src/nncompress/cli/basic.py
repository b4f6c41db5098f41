"""Foundation commands: models, train, eval, stats, demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    MODEL_HELP,
    RichProgress,
    add_data_args,
    add_factory_arg,
    add_json_arg,
    add_model_arg,
    add_quiet_arg,
    checkpoint_out,
    console,
    dataset_for,
    open_model,
    out,
    print_json,
    print_table,
    refuse_inapplicable,
)
from .hf import existing_path


def register(sub: argparse._SubParsersAction) -> None:
    _add_models(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_stats(sub)
    _add_demo(sub)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the reference models",
        description="List the reference models of the registry.",
    )
    add_json_arg(p)
    p.set_defaults(func=cmd_models)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a reference model and save a checkpoint",
        description="Train a registry model on a dataset; writes OUT (.safetensors) "
        "and its JSON sidecar (model, dataset and normalisation, metrics, training recipe). "
        "Accuracy is reported on the test split; the held-out split (carved from the "
        "training set) is used for per-epoch validation and early stopping.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="registry name (see 'nncompress models')")
    g.add_argument(
        "--model-factory",
        metavar="MODULE:FUNCTION",
        help="train your own architecture: an importable function returning a freshly built "
        "model, e.g. mynets:make_net (mynets.py in the current folder or on PYTHONPATH); "
        "later commands on the checkpoint take the same --model-factory",
    )
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=["fashion-mnist", "mnist", "digits", "synthetic"],
        help="dataset: fashion-mnist (Debian package or --data-dir), mnist (needs --data-dir), "
        "digits (scikit-learn 8x8), synthetic (tiny test set) (default: fashion-mnist)",
    )
    add_data_args(p, fallback=False)
    p.add_argument("--epochs", type=int, default=10, help="number of epochs (default: 10)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default: 0.05)")
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adam", "adamw"],
        help="optimizer; sgd uses Nesterov momentum 0.9 (default: sgd)",
    )
    p.add_argument(
        "--schedule",
        default="cosine",
        choices=["constant", "cosine", "step", "onecycle"],
        help="learning-rate schedule over all steps (default: cosine)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default: 128)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=5e-4,
        help="L2 penalty on weights, not on biases or BatchNorm (default: 5e-4)",
    )
    p.add_argument("--l1", type=float, default=0.0, help="L1 penalty on weights (default: 0 = off)")
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        metavar="EPS",
        help="label smoothing of the cross-entropy, in [0, 1) (default: 0 = off)",
    )
    p.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        metavar="NORM",
        help="clip the global gradient L2 norm to NORM > 0 (default: no clipping)",
    )
    p.add_argument(
        "--early-stopping",
        type=int,
        default=0,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without a lower held-out loss and keep the best "
        "epoch's weights (default: 0 = off)",
    )
    p.add_argument(
        "--restore-best",
        action="store_true",
        help="end with the weights of the epoch with the best held-out accuracy",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="random 2-pixel shifts and horizontal flips of training images",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--out", required=True, type=checkpoint_out, help="output checkpoint (.safetensors)"
    )
    add_quiet_arg(p)
    p.set_defaults(func=cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy and loss of a checkpoint on the test split",
        description="Evaluate a checkpoint on the test split of the dataset "
        "recorded in its sidecar.",
    )
    p.add_argument(
        "checkpoint",
        type=existing_path,
        help=MODEL_HELP + " (exit models print their exit histogram), an ONNX model (.onnx), "
        "a cascade manifest (.json from nncompress cascade --out), or a Hugging Face folder / "
        ".ncz written from one (with --reference and --text)",
    )
    add_factory_arg(p)
    add_data_args(p)
    p.add_argument(
        "--reference", type=Path, help="Hugging Face models: the original folder to compare with"
    )
    p.add_argument(
        "--text", type=Path, help="Hugging Face models: held-out text, one example per line"
    )
    p.add_argument(
        "--examples", type=int, default=256, help="Hugging Face models: examples (default 256)"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="test split (final reporting) or the held-out val split (default: test)",
    )
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_eval)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="params, nonzeros, MACs, bytes and latency per layer",
        description="Per-layer and total parameters, nonzeros, sparsity, dense fp32 "
        "bytes, MACs (dense and nonzero-only) and measured latency "
        "(median, warm-up excluded).",
    )
    add_model_arg(p, help=MODEL_HELP + ", or an ONNX model (.onnx)")
    p.add_argument(
        "--batches",
        default="1,64",
        help="comma-separated batch sizes for latency (default: 1,64; '' to skip)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=50,
        help="timed runs per batch size; the median is reported (default: 50)",
    )
    add_json_arg(p)
    p.set_defaults(func=cmd_stats)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: run the flagship example end to end",
        description="Deep Compression of LeNet-300-100 on Fashion-MNIST end to end with quick "
        "settings (1 epoch per training step): train, prune, share weights, fine-tune, "
        "Huffman-encode to model.ncz, decode and evaluate; prints the per-layer table and "
        "writes report.md with figures (about 1 minute with 1 thread on an idle core).",
    )
    add_data_args(p, fallback=False)
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over, replacing the demo run in --out (by default a finished demo is "
        "reported again and an interrupted one resumed; other files are never overwritten)",
    )
    p.set_defaults(func=cmd_demo)


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import create, list_models

    rows = []
    for info in list_models():
        n = sum(p.numel() for p in create(info.name).parameters())
        rows.append({"name": info.name, "params": n, "description": info.description})
    if args.json:
        print_json(rows)
    else:
        print_table(
            "models",
            ["name", "params", "description"],
            [[r["name"], r["params"], r["description"]] for r in rows],
        )
    return 0


def _model_kwargs(name: str, splits) -> dict:
    from ..models import default_kwargs

    return default_kwargs(name, splits.input_shape, splits.num_classes)


def train_model(
    name: str | None,
    splits,
    cfg,
    out_path: Path,
    progress=None,
    *,
    channels_last=False,
    factory: str | None = None,
):
    """Train a registry model (or ``factory``'s, ``--model-factory``) and save it; returns
    ``(model, metrics)``.

    ``channels_last`` trains conv nets in NHWC memory layout (about 1.4x faster on CPU here).
    """
    import torch

    from ..engine import evaluate, fit, save_checkpoint, seed_everything
    from ..models import create
    from .common import build_from_factory

    seed_everything(cfg.seed)
    if factory:
        kwargs: dict = {}
        model = build_from_factory(factory)
    else:
        kwargs = _model_kwargs(name, splits)
        model = create(name, **kwargs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    history = fit(
        model,
        splits.loader("train", cfg.batch_size, seed=cfg.seed, augment=cfg.augment),
        cfg,
        val_loader=splits.loader("val", 512),
        progress=progress,
    )
    test = evaluate(model, splits.loader("test", 512))
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": history.last.get("val_accuracy"),
        "train_wall_time_s": history.wall_time_s,
    }
    from ..engine import config_to_dict

    extra: dict = {"train_config": config_to_dict(cfg)}
    if factory:
        extra["model_factory"] = factory
    save_checkpoint(
        model,
        out_path,
        model_name=None if factory else name,
        model_kwargs=kwargs,
        dataset=splits.describe(),
        metrics=metrics,
        history=history.epochs,
        extra=extra,
        reference=build_from_factory(factory) if factory else None,
    )
    return model, metrics


def cmd_train(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..engine import TrainConfig
    from ..models import MODELS

    if args.model is not None and args.model not in MODELS:
        raise ValueError(f"--model={args.model!r}: must be one of {sorted(MODELS)}")
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        l1=args.l1,
        label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip,
        early_stopping=args.early_stopping,
        restore_best=args.restore_best,
        augment=args.augment,
        seed=args.seed,
    )
    splits = load_dataset(args.dataset, args.data_dir)
    _, metrics = train_model(
        args.model, splits, cfg, args.out, RichProgress(not args.quiet), factory=args.model_factory
    )
    out.print(
        f"test accuracy {metrics['test_accuracy']:.2f}%  ({metrics['train_wall_time_s']:.1f} s)"
        f"  -> {args.out}"
    )
    from ..recipe.report import at_chance

    if at_chance(metrics["test_accuracy"], splits.num_classes):
        console.print(
            f"[bold red]WARNING: test accuracy {metrics['test_accuracy']:.2f}% is at chance "
            f"level ({100 / splits.num_classes:.1f}% for {splits.num_classes} classes): the "
            "model learned nothing; check --lr, --epochs and the data[/bold red]",
            highlight=False,
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..engine import evaluate

    if args.split not in ("test", "val"):
        raise ValueError(f"--split={args.split!r}: must be 'test' or 'val'")
    # --- ONNX models (nncompress.cli.quant) ---
    if args.checkpoint.suffix == ".onnx":
        from .quant import cmd_eval_onnx

        return cmd_eval_onnx(args)
    # --- end ONNX ---
    # --- Hugging Face folders and .ncz files written from them (nncompress.cli.hf) ---
    if args.checkpoint.is_dir() or args.reference is not None:
        from .hf import cmd_eval_hf

        return cmd_eval_hf(args)
    # --- end Hugging Face ---
    # --- exit models and cascades (nncompress.cli.conditional) ---
    from ..conditional import ConditionalModel

    if args.checkpoint.suffix == ".json":
        from .conditional import cmd_eval_conditional, load_for_eval

        return cmd_eval_conditional(args, *load_for_eval(args.checkpoint, args.data_dir))
    model, sidecar = open_model(args.checkpoint, args)
    splits = dataset_for(sidecar, args.data_dir, args.dataset, args.checkpoint)
    if isinstance(model, ConditionalModel):
        from .conditional import cmd_eval_conditional

        return cmd_eval_conditional(args, model, splits)
    # --- end exit models ---
    res = evaluate(model, splits.loader(args.split, 512), progress=RichProgress(not args.quiet))
    return print_accuracy(args, res)


def print_accuracy(args: argparse.Namespace, res: dict, runtime: str | None = None) -> int:
    """Print (or ``--json``) the result of ``nncompress eval``."""
    res["split"] = args.split
    if runtime:
        res["runtime"] = runtime
    if args.json:
        print_json(res)
    else:
        where = f", {runtime}" if runtime else ""
        out.print(
            f"{args.split} accuracy {res['accuracy']:.2f}%  loss {res['loss']:.4f}  "
            f"({res['samples']} samples{where})"
        )
    return 0


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError as exc:
        raise ValueError(f"--batches={text!r}: must be comma-separated positive integers") from exc
    if any(b < 1 for b in batches):
        raise ValueError(f"--batches={text!r}: batch sizes must be >= 1")
    return batches


def show_stats(stats, as_json: bool, title: str) -> None:
    d = stats.to_dict()
    if as_json:
        print_json(d)
        return
    rows = [
        [
            x["name"],
            x["type"],
            "x".join(map(str, x["shape"])),
            x["params"],
            x["nonzeros"],
            f"{100 * x['sparsity']:.1f}%",
            x["macs"],
            x["macs_nonzero"],
        ]
        for x in d["layers"]
    ]
    rows.append(
        [
            "total",
            "",
            "",
            d["params"],
            d["nonzeros"],
            f"{100 * d['sparsity']:.1f}%",
            d["macs"],
            d["macs_nonzero"],
        ]
    )
    print_table(
        title,
        ["layer", "type", "shape", "params", "nonzeros", "sparsity", "MACs", "MACs (nonzero)"],
        rows,
    )
    out.print(f"dense fp32 bytes: {d['bytes_fp32']:,}")
    if d.get("expected_macs") is not None:
        out.print(
            f"expected MACs per sample (held-out exit rates): {d['expected_macs']:,.0f} "
            f"({d['expected_macs'] / d['macs']:.3f}x of every branch's {d['macs']:,})"
        )
    for k, v in d["latency_ms"].items():
        out.print(f"latency {k.replace('_', ' ')}: {v:.3f} ms (median)")


def cmd_stats(args: argparse.Namespace) -> int:
    from ..stats import model_stats

    batches = _parse_batches(args.batches)
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats}: must be >= 1")
    refuse_inapplicable(args, {"repeats": (bool(batches), "not with --batches '' (no latency)")})
    # --- ONNX models (nncompress.cli.quant) ---
    if args.checkpoint.suffix == ".onnx":
        from .quant import cmd_stats_onnx

        return cmd_stats_onnx(args, batches)
    # --- end ONNX ---
    model, sidecar = open_model(args.checkpoint, args)
    shape = tuple((sidecar.get("dataset") or {}).get("input_shape") or ())
    conditional = callable(getattr(model, "forward_all", None))
    if conditional:  # random inputs leave at arbitrary exits: their latency means nothing
        batches = ()
    stats = model_stats(
        model, shape or None, latency_batches=batches if shape else (), repeats=args.repeats
    )
    show_stats(stats, args.json, str(args.checkpoint))
    if conditional and not args.json:
        out.print(
            "latency of an exit model depends on its inputs: measure it over data "
            "(nncompress.stats.measure_latency_over, benchmarks/early_exit.py)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Deep Compression of LeNet-300-100 on Fashion-MNIST, end to end, with quick settings.

    Runs ``recipes/deep-compression-lenet-300-100.yaml`` with ``--quick``: every epoch count is
    capped at the recipe's ``quick.epochs`` (1), i.e. train 1 epoch, prune to 8/9/26% kept in
    3 iterations of 1 retraining epoch, share 6-bit weights, fine-tune the centroids 1 epoch,
    Huffman-encode. The file is decoded and evaluated; the final table is printed.
    """
    import dataclasses

    from ..recipe import load_recipe, run_recipe, run_status
    from .run import announce, interrupt_text, print_run_report

    path = Path(__file__).resolve().parents[3] / "recipes" / "deep-compression-lenet-300-100.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe '{path}' not found: the demo runs from a source checkout of nncompress"
        )
    recipe = load_recipe(path)
    if args.data_dir:
        recipe = dataclasses.replace(recipe, data_dir=args.data_dir)
    status = run_status(recipe, args.out, quick=True)
    if status["state"] in ("foreign", "other") and not args.fresh:
        what = "files of something else" if status["state"] == "foreign" else "another run"
        raise ValueError(
            f"--out={str(args.out)!r} holds {what}: the demo does not overwrite it; choose "
            "another --out, or pass --fresh to replace the run there"
        )
    out.print(f"Deep Compression demo: {path.name} with quick settings -> {args.out}")
    announce(recipe, args.out, resume=not args.fresh, quick=True)
    args.interrupt_hint = lambda: interrupt_text(recipe, args.out, True)
    report = run_recipe(
        recipe, args.out, progress=RichProgress(), resume=not args.fresh, quick=True
    )
    print_run_report(report, quick_epochs=recipe.quick_epochs)
    out.print(
        f"report: {args.out / 'report.md'} (figures: {', '.join(report.get('figures') or [])}), "
        f"compressed model: {args.out / 'model.ncz'}"
    )
    return 0
