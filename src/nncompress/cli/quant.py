"""Linear quantization commands: ``quantize`` (checkpoint -> integer ONNX model), and the ONNX
branches of ``eval`` / ``stats`` (called from :mod:`nncompress.cli.basic` for ``*.onnx``)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .common import (
    CheckpointJob,
    RichProgress,
    add_data_args,
    add_json_arg,
    add_model_arg,
    add_quiet_arg,
    dataset_for,
    out,
    print_json,
    print_table,
    refuse_inapplicable,
)
from .coverage import print_coverage
from .pq import add_pq_args, cmd_quantize_pq


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="linear INT8/INT4 quantization (PTQ or QAT) to an integer ONNX model",
        description="Quantize a checkpoint's weights (symmetric, per output channel) and "
        "activations (asymmetric, calibrated on the held-out split), optionally fine-tune with "
        "quantization-aware training, and write a QDQ ONNX model with integer initializers that "
        "onnxruntime runs with integer kernels. Prints test accuracy before (PyTorch fp32) and "
        "after (onnxruntime), file sizes and each layer's precision.",
    )
    add_model_arg(p)
    p.add_argument(
        "--method",
        default="ptq",
        choices=["ptq", "qat", "pq"],
        help="ptq / qat: integer ONNX model (default: ptq); pq: product quantization "
        "(Stock et al. 2020) into a .ncz file",
    )
    p.add_argument("--weights", default="int8", choices=["int8", "int4"], help="default: int8")
    p.add_argument(
        "--activations",
        default="uint8",
        choices=["uint8", "int8", "none"],
        help="8-bit activation storage (same asymmetric grid; onnxruntime's x86 kernels are "
        "uint8 x int8, so uint8 is the default) or 'none' for weight-only",
    )
    p.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one weight scale per output channel (default) or per tensor",
    )
    p.add_argument(
        "--observer",
        default="minmax",
        choices=["minmax", "moving_average", "percentile", "kl"],
        help="activation range estimator (default: minmax; QAT uses moving averages)",
    )
    p.add_argument(
        "--calibration",
        type=int,
        default=None,
        help="ptq/qat: held-out samples to calibrate (default 512); pq: training images for "
        "the activations and the codeword fine-tuning (default 4096)",
    )
    p.add_argument(
        "--keep-first-last",
        default=None,
        choices=["int8", "fp32"],
        help="keep the first and last layers at int8 (useful with --weights int4) or fp32",
    )
    p.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="7-bit int8 weights: exact integer kernels on x86 CPUs without VNNI, where full "
        "8-bit weights saturate (default: on; --no-reduce-range for full 8-bit weights)",
    )
    p.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs (default: 1)")
    p.add_argument(
        "--lr-scale",
        type=float,
        default=0.1,
        help="QAT learning rate relative to the checkpoint's training rate (default: 0.1)",
    )
    p.add_argument("--lsq", action="store_true", help="QAT with learned step sizes (LSQ)")
    p.add_argument(
        "--out", required=True, type=Path, help="output ONNX model (.onnx), or .ncz with pq"
    )
    add_pq_args(p)
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_quantize)


_PQ_ONLY = ("block_size", "k", "bits_per_weight", "objective", "layer_steps", "layer_lr",
            "global_steps", "global_lr", "exclude", "codec")  # fmt: skip
_LINEAR_ONLY = ("weights", "activations", "per_channel", "observer", "keep_first_last",
                "reduce_range", "threads")  # fmt: skip


def _quantize_rules(args: argparse.Namespace) -> dict[str, tuple[bool, str]]:
    """Which options apply to this ``quantize`` call (the others are refused, not ignored)."""
    m = args.method
    rules = {k: (m == "pq", f"only with --method pq (got {m})") for k in _PQ_ONLY}
    rules.update({k: (m != "pq", f"only with --method ptq or qat (got {m})") for k in _LINEAR_ONLY})
    rules.update(
        qat_epochs=(m == "qat", f"only with --method qat (got {m})"),
        lr_scale=(m == "qat", f"only with --method qat (got {m})"),
        lsq=(m == "qat", f"only with --method qat (got {m})"),
    )
    if m != "pq" and args.activations == "none":
        rules["observer"] = (False, "only with quantized activations (got --activations none)")
    return rules


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..quant.onnx_export import export_onnx
    from ..stages.quantize import QuantizeStageConfig, run_quantize_stage

    refuse_inapplicable(args, _quantize_rules(args))
    if args.method == "pq":
        if args.out.suffix != ".ncz":
            raise ValueError(f"--out={str(args.out)!r}: must end in .ncz with --method pq")
        args.calibration = 4096 if args.calibration is None else args.calibration
        return cmd_quantize_pq(args)
    if args.out.suffix != ".onnx":
        raise ValueError(f"--out={str(args.out)!r}: must end in .onnx")
    args.calibration = 512 if args.calibration is None else args.calibration
    cfg = QuantizeStageConfig(
        method=args.method,
        weights=args.weights,
        activations=args.activations,
        per_channel=args.per_channel,
        observer=args.observer,
        calibration=args.calibration,
        keep_first_last=args.keep_first_last,
        reduce_range=args.reduce_range,
        qat_epochs=args.qat_epochs,
        lr_scale=args.lr_scale,
        lsq=args.lsq,
        out=args.out.name,
        threads=args.threads,
    )
    job = CheckpointJob(args, bars=not args.quiet and not args.json)
    model, splits = job.model, job.splits
    before = job.accuracy(batch=500)
    out_dir = args.out.parent if str(args.out.parent) else Path(".")
    ctx = job.context(out_dir)
    rep = run_quantize_stage(ctx, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", tuple(splits.input_shape))
        fp32_bytes = fp32.stat().st_size
    res = {
        "checkpoint": str(args.checkpoint),
        "out": str(args.out),
        "accuracy_before": before,
        "accuracy_after": rep["accuracy_onnx"],
        "accuracy_sim": rep["accuracy_sim"],
        "onnx_bytes": rep["onnx_bytes"],
        "fp32_onnx_bytes": fp32_bytes,
        "checkpoint_bytes": args.checkpoint.stat().st_size,
        "compression": fp32_bytes / rep["onnx_bytes"],
        "layers": rep["layers"],
        "coverage": rep.get("coverage"),
        "config": cfg.to_dict(),
    }
    if args.json:
        print_json(res)
        return 0
    print_table(
        "layer precisions",
        ["layer", "type", "weights", "per-channel", "activations", "params"],
        [
            [
                r["layer"],
                r["type"].replace("Parametrized", ""),
                r["weights"],
                r["per_channel"],
                r["activations"],
                r["params"],
            ]
            for r in rep["layers"]
        ],
    )
    print_coverage(rep.get("coverage"))
    out.print(
        f"test accuracy: {before:.2f}% (fp32, PyTorch) -> {rep['accuracy_onnx']:.2f}% "
        f"(onnxruntime; PyTorch simulation {rep['accuracy_sim']:.2f}%)"
    )
    out.print(
        f"size: {rep['onnx_bytes']:,} bytes vs {fp32_bytes:,} fp32 ONNX "
        f"({res['compression']:.2f}x smaller) -> {args.out}"
    )
    return 0


# ------------------------------------------------------------------ eval / stats on .onnx files


def cmd_eval_onnx(args: argparse.Namespace) -> int:
    """``nncompress eval model.onnx``: accuracy of the ONNX model run by onnxruntime (called
    by ``cmd_eval``, which checked ``--split``)."""
    from ..quant.onnx_export import evaluate_onnx, onnx_metadata
    from .basic import print_accuracy

    meta = onnx_metadata(args.checkpoint)
    if not isinstance(meta.get("dataset"), dict):
        raise ValueError(
            f"'{args.checkpoint}' has no 'dataset' in its metadata_props (write it with "
            "nncompress quantize / export_onnx(metadata={'dataset': splits.describe()}))"
        )
    splits = dataset_for(meta, args.data_dir, args.dataset, args.checkpoint)
    res = evaluate_onnx(
        args.checkpoint,
        splits.loader(args.split, 500),
        threads=args.threads,
        progress=RichProgress(not args.quiet),
    )
    return print_accuracy(args, res, "onnxruntime")


def cmd_stats_onnx(args: argparse.Namespace, batches: tuple[int, ...]) -> int:
    """``nncompress stats model.onnx``: bytes per initializer, MACs, onnxruntime latency."""
    from ..quant.onnx_export import onnx_stats

    st = onnx_stats(args.checkpoint, batches=batches, repeats=args.repeats, threads=args.threads)
    if args.json:
        print_json(st)
        return 0
    print_table(
        str(args.checkpoint),
        ["name", "dtype", "shape", "bytes"],
        [
            [i["name"], i["dtype"], "x".join(map(str, i["shape"])) or "scalar", i["bytes"]]
            for i in st["initializers"]
            if i["bytes"] >= 64
        ],
    )
    out.print(
        f"file bytes: {st['file_bytes']:,}  initializers: "
        + ", ".join(f"{k} {v:,} B" for k, v in sorted(st["bytes_by_dtype"].items()))
    )
    if st["macs"] is not None:
        out.print(f"MACs per sample: {st['macs']:,}")
    out.print("ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(st["ops"].items())))
    for k, v in st["latency_ms"].items():
        out.print(
            f"latency {k.replace('_', ' ')}: {v:.3f} ms (median, onnxruntime, "
            f"{st['threads']} thread{'s' if st['threads'] > 1 else ''})"
        )
    return 0
