"""``nncompress quantize CKPT --method pq``: product quantization (Stock et al. 2020) of a
checkpoint into a ``.ncz`` file; the arguments are registered by :mod:`nncompress.cli.quant`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.select import LayerSelector
from .common import CheckpointJob, out, print_json, print_table

BLOCKS = {"small": (9, 4, 4), "large": (18, 8, 8)}


def block_sizes(value: str) -> tuple[int, int, int]:
    """argparse type of ``--block-size``: 'small', 'large' or CONV[,PW[,FC]] integers."""
    if value in BLOCKS:
        return BLOCKS[value]
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"--block-size={value!r}: 'small' (9,4,4), 'large' (18,8,8) or CONV[,PW[,FC]] "
            "positive integers (k x k convs, 1x1 convs, Linear)"
        )
    conv, pw, fc = parts + list(BLOCKS["small"][len(parts) :])
    return conv, pw, fc


def add_pq_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("product quantization (--method pq, writes a .ncz file)")
    g.add_argument(
        "--block-size",
        type=block_sizes,
        default=BLOCKS["small"],
        help="subvector size: 'small' (9 for k x k convs, 4 for 1x1 convs and Linear; "
        "default), 'large' (18 / 8 / 8) or CONV[,PW[,FC]]",
    )
    g.add_argument("--k", type=int, default=256, help="codewords per layer, at most (default 256)")
    g.add_argument(
        "--bits-per-weight",
        type=float,
        default=None,
        help="per-layer budget counting the fp16 codebook: each layer gets the largest "
        "power-of-two k <= --k that fits (default: k clamped to subvectors / 4)",
    )
    g.add_argument(
        "--objective",
        default="activation",
        choices=["activation", "weight"],
        help="reconstruct layer outputs on calibration inputs (default) or the weights",
    )
    g.add_argument("--layer-steps", type=int, default=100, help="per-layer fine-tuning steps")
    g.add_argument("--layer-lr", type=float, default=0.1, help="per-layer codeword lr")
    g.add_argument("--global-steps", type=int, default=500, help="final fine-tuning steps")
    g.add_argument("--global-lr", type=float, default=0.02, help="final codeword lr")
    g.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="layer name or glob left unquantized (repeatable), e.g. --exclude conv1",
    )
    g.add_argument(
        "--codec",
        default="ans",
        choices=["ans", "huffman", "raw"],
        help="entropy coder of the codes (smaller of it and fixed width; default ans)",
    )


def cmd_quantize_pq(args: argparse.Namespace) -> int:
    from ..core.modules import folded_copy
    from ..io import (
        EncodeConfig,
        checkpoint_metadata,
        decode_file,
        pq_block_hints,
        round_for_storage_,
        save_compressed,
    )
    from ..io.checkpoint import model_from_metadata
    from ..quant.pq_transform import pq_plan
    from ..stages.pq import PQStageConfig, run_pq_stage

    conv, pw, fc = args.block_size
    cfg = PQStageConfig(  # every field is validated here, before any data is read
        block_size_conv=conv,
        block_size_pw=pw,
        block_size_fc=fc,
        k=args.k,
        bits_per_weight=args.bits_per_weight,
        objective=args.objective,
        layer_steps=args.layer_steps,
        layer_lr=args.layer_lr,
        global_steps=args.global_steps,
        global_lr=args.global_lr,
        exclude=tuple(args.exclude),
        calibration=args.calibration,
    )
    job = CheckpointJob(args, bars=not args.quiet and not args.json)
    model = job.model
    pq_plan(model, cfg.algorithm, filter=LayerSelector(exclude=cfg.exclude))  # d and k, early
    before = job.accuracy(batch=500)
    out_dir = args.out.parent if str(args.out.parent) else Path(".")
    rep = run_pq_stage(job.context(out_dir), cfg)
    enc = EncodeConfig(
        codec=args.codec,
        codebook_dtype="fp16",
        dense_dtype="fp16",
        pq_block_size=pq_block_hints(model),
    )
    plain = folded_copy(model)
    round_for_storage_(plain, enc)
    report = save_compressed(
        plain, args.out, enc, checkpoint_metadata(job.sidecar), progress=job.progress
    )
    state, meta = decode_file(args.out)
    decoded, _ = model_from_metadata(meta, state)
    decoded.load_state_dict(state)
    after = job.accuracy(decoded, batch=500)
    layers = [
        {
            "layer": t.name.removesuffix(".weight"),
            "scheme": t.scheme,
            "d": t.block_size or None,
            "k": t.codebook_size or None,
            "bits_per_weight": t.bits_per_weight,
            "bytes": t.total_bytes,
        }
        for t in report.tensors
        if t.name.endswith(".weight") and len(t.shape) >= 2
    ]
    res = {
        "checkpoint": str(args.checkpoint),
        "out": str(args.out),
        "accuracy_before": before,
        "accuracy_after": after,
        "file_bytes": report.total_bytes,
        "fp32_bytes": report.original_bytes,
        "compression": report.ratio,
        "layers": layers,
        "pq": rep,
    }
    if args.json:
        print_json(res)
        return 0
    print_table(
        "product-quantized layers (bits/w: codes plus the codebook's share)",
        ["layer", "scheme", "d", "k", "bits/w", "bytes"],
        [
            [r["layer"], r["scheme"], r["d"] or "", r["k"] or "", r["bits_per_weight"], r["bytes"]]
            for r in layers
        ],
    )
    out.print(
        f"test accuracy: {before:.2f}% -> {after:.2f}% (decoded {args.out}); "
        f"{report.total_bytes:,} bytes vs {report.original_bytes:,} fp32 "
        f"([bold]{report.ratio:.1f}x[/bold] smaller)"
    )
    return 0
