"""``nncompress share``: trained quantization by k-means weight sharing (Deep Compression,
Han et al. 2016, section 3) from the command line, optionally with centroid fine-tuning and
straight to an entropy-coded ``.ncz`` file. The recipe stages ``share`` and ``finetune`` run
the same code."""

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
    refuse_inapplicable,
)
from .coverage import print_coverage

__all__ = ["register"]


def _out_path(value: str) -> Path:
    path = Path(value)
    if path.suffix not in (".safetensors", ".ncz"):
        raise argparse.ArgumentTypeError(
            f"'{value}' must end in .safetensors (checkpoint) or .ncz (compressed file)"
        )
    return path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "share",
        help="k-means weight sharing (Deep Compression stage 2), optionally fine-tuned and encoded",
        description="Cluster each Linear/Conv layer's nonzero weights into 2**bits shared "
        "values with exact 1-D k-means (pruned zeros stay zero), optionally fine-tune the "
        "centroids (the summed/averaged gradient of their weights), and write OUT: a "
        "checkpoint (.safetensors), or a .ncz file (codebook + relative-index positions, "
        "entropy-coded) that is then decoded and evaluated. Prints per-layer bits and test "
        "accuracy before and after.",
    )
    add_model_arg(p)
    p.add_argument(
        "--bits",
        type=int,
        default=None,
        help="bits per shared weight for every layer (k = 2**bits values); without it the "
        "paper's 8 (conv) / 5 (fully connected)",
    )
    p.add_argument("--bits-conv", type=int, default=None, help="bits of conv layers")
    p.add_argument("--bits-fc", type=int, default=None, help="bits of the other layers")
    p.add_argument(
        "--per-layer",
        default=None,
        metavar="NAME=BITS,...",
        help="per-layer bits, e.g. fc3=6",
    )
    p.add_argument(
        "--init",
        default="linear",
        choices=["linear", "density", "forgy"],
        help="centroid initialisation (Han 2016: linear works best)",
    )
    p.add_argument(
        "--exclude", nargs="*", default=[], help="layer names (fnmatch patterns) left unshared"
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="epochs of centroid fine-tuning after sharing (0: none)",
    )
    p.add_argument(
        "--lr-scale", type=float, default=0.1, help="fine-tuning lr = lr-scale * checkpoint's lr"
    )
    p.add_argument(
        "--codec",
        default="huffman",
        choices=["huffman", "ans", "raw"],
        help="entropy coder when OUT is a .ncz file",
    )
    p.add_argument(
        "--out", required=True, type=_out_path, help="output: checkpoint (.safetensors) or .ncz"
    )
    add_data_args(p)
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_share)


def _per_layer(text: str | None) -> dict[str, int]:
    if not text:
        return {}
    out_map: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--per-layer={text!r}: expected NAME=BITS[,NAME=BITS] (integers)")
        out_map[name.strip()] = int(value)
    return out_map


def cmd_share(args: argparse.Namespace) -> int:
    from ..stages.finetune import FinetuneStageConfig, run_finetune_stage
    from ..stages.share import ShareStageConfig, run_share_stage

    tune = "only with --finetune-epochs > 0 (nothing is fine-tuned)"
    refuse_inapplicable(
        args,
        {
            "lr_scale": (args.finetune_epochs > 0, tune),
            "codec": (args.out.suffix == ".ncz", "only with --out FILE.ncz"),
        },
    )
    conv = args.bits_conv if args.bits_conv is not None else args.bits
    fc = args.bits_fc if args.bits_fc is not None else args.bits
    cfg = ShareStageConfig(  # validated before the checkpoint is read
        bits_conv=8 if conv is None else conv,
        bits_fc=5 if fc is None else fc,
        per_layer=_per_layer(args.per_layer),
        init=args.init,
        exclude=tuple(args.exclude),
    )
    tune = None
    if args.finetune_epochs:
        tune = FinetuneStageConfig.from_dict(
            {"epochs": args.finetune_epochs, "lr_scale": args.lr_scale}
        )
    job = CheckpointJob(args, bars=not args.quiet and not args.json)
    before = job.accuracy()
    ctx = job.context(args.out.parent)
    report = run_share_stage(ctx, cfg)
    if tune is not None:
        run_finetune_stage(ctx, tune)
    after = job.accuracy()
    result = {
        "checkpoint": str(args.checkpoint),
        "out": str(args.out),
        "test_accuracy_before": before,
        "test_accuracy_after": after,
        "finetune_epochs": args.finetune_epochs,
        "layers": report["layers"],
        "coverage": report.get("coverage"),
    }
    extra = job.extra("share", {"config": cfg.to_dict(), "layers": report["layers"]})
    if args.out.suffix == ".ncz":
        result.update(_write_ncz(job, args, after, extra))
    else:
        job.save(job.model, args.out, {"test_accuracy": after}, extra)
    if args.json:
        print_json(result)
        return 0
    print_table(
        f"k-means weight sharing ({args.checkpoint})",
        ["layer", "weights", "nonzeros", "bits", "k", "rate (eq. 2)"],
        [
            [r["name"], r["n_weights"], r["n_nonzero"], r["bits"], r["k"], r["compression_rate"]]
            for r in report["layers"]
        ],
    )
    print_coverage(report.get("coverage"))
    tail = f" after {args.finetune_epochs} fine-tuning epochs" if args.finetune_epochs else ""
    out.print(f"test accuracy {before:.2f}% -> {after:.2f}%{tail}  -> {args.out}")
    if "file_bytes" in result:
        out.print(
            f"{result['file_bytes']:,} bytes vs {result['dense_bytes']:,} dense "
            f"({result['ratio']:.1f}x smaller); decoded file: "
            f"{result['test_accuracy_decoded']:.2f}%"
        )
    return 0


def _write_ncz(job: CheckpointJob, args: argparse.Namespace, after: float, extra: dict) -> dict:
    """Encode the shared model to ``args.out`` (.ncz), decode it and evaluate the file."""
    from ..core.modules import folded_copy
    from ..io import EncodeConfig, load_model_file, save_compressed

    plain = folded_copy(job.model)
    meta = {
        "checkpoint": {
            "architecture": job.architecture,
            "dataset": job.splits.describe(),
            "metrics": {"test_accuracy": after},
            "extra": {**extra, **({"model_factory": job.factory} if job.factory else {})},
        }
    }
    rep = save_compressed(plain, args.out, EncodeConfig(codec=args.codec), meta)
    fresh = None
    if job.factory:
        from .common import build_from_factory

        fresh = build_from_factory(job.factory)
    decoded, _ = load_model_file(args.out, fresh)
    return {
        "file_bytes": rep.total_bytes,
        "dense_bytes": rep.original_bytes,
        "ratio": rep.ratio,
        "test_accuracy_decoded": job.accuracy(decoded),
    }
