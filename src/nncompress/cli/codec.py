"""Compressed-file commands: encode a checkpoint into .ncz, decode it back, inspect it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    RichProgress,
    add_factory_arg,
    add_json_arg,
    add_model_arg,
    add_quiet_arg,
    checkpoint_out,
    existing_file,
    open_model,
    out,
    print_json,
    print_table,
    refuse_inapplicable,
)


def register(sub: argparse._SubParsersAction) -> None:
    _add_encode(sub)
    _add_decode(sub)
    _add_inspect(sub)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="write a checkpoint as a compressed .ncz file",
        description="Encode a checkpoint (.safetensors + sidecar) into the .ncz container: "
        "tensors with few distinct values become a codebook plus relative-index sparse "
        "positions and entropy-coded codes (Deep Compression stage 3); the rest is stored "
        "densely. Lossless unless an fp16 option is given.",
    )
    add_model_arg(p)
    p.add_argument("--out", required=True, type=Path, help="output file (.ncz)")
    p.add_argument(
        "--codec",
        default="huffman",
        choices=["huffman", "ans", "raw", "context"],
        help="entropy coder of the code and index streams (default: huffman)",
    )
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "sparse", "dense", "context"],
        help="positions of codebook tensors (default: auto, the smallest; 'context' codes the "
        "significance map and codes of 2+-D weights with density-class contexts)",
    )
    p.add_argument(
        "--index-bits-conv", type=int, default=8, help="relative-index bits, conv (default: 8)"
    )
    p.add_argument(
        "--index-bits-fc", type=int, default=5, help="relative-index bits, others (default: 5)"
    )
    p.add_argument(
        "--auto-index-bits",
        action="store_true",
        help="try every index width b in [2, 12] per layer and keep the smallest file",
    )
    p.add_argument(
        "--codebook-dtype",
        default="fp32",
        choices=["fp32", "fp16"],
        help="codebook storage; fp16 rounds (default: fp32, exact)",
    )
    p.add_argument(
        "--dense-dtype",
        default="fp32",
        choices=["fp32", "fp16"],
        help="dense float32 tensors; fp16 rounds (default: fp32, exact)",
    )
    p.add_argument(
        "--max-codebook-bits",
        type=int,
        default=8,
        help="a tensor with at most 2**N distinct nonzero values may use a codebook (default: 8)",
    )
    p.add_argument(
        "--history",
        action="store_true",
        help="also store the checkpoint's per-epoch training history in the metadata",
    )
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_encode)


def _add_decode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decode",
        help="decode a .ncz file into a checkpoint",
        description="Decode a .ncz file (bit-exactly) into a checkpoint that "
        "'nncompress eval' and load_checkpoint() read.",
    )
    p.add_argument("file", type=existing_file, help="compressed file (.ncz)")
    p.add_argument("--out", type=checkpoint_out, help="output checkpoint (.safetensors)")
    p.add_argument(
        "--hf-out",
        type=Path,
        help="for a file written from a Hugging Face model: the folder to write "
        "(AutoModel.from_pretrained loads it); new or empty",
    )
    p.add_argument(
        "--tokenizer-from", type=Path, help="with --hf-out: copy tokenizer files from this folder"
    )
    add_max_bytes_arg(p)
    add_factory_arg(p)
    p.set_defaults(func=cmd_decode)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="itemised size of a .ncz file, per tensor",
        description="Per-tensor scheme, weights kept, codebook size, weight-code and "
        "relative-index bits per nonzero (fixed 'P+Q' and entropy-coded 'H'), fillers, "
        "bytes and compression, plus per-stream entropy vs bits spent.",
    )
    p.add_argument("file", type=existing_file, help="compressed file (.ncz)")
    p.add_argument("--streams", action="store_true", help="also list every coded stream")
    add_max_bytes_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_inspect)


def _byte_count(text: str) -> int:
    """argparse type of ``--max-bytes``: an integer >= 1, optionally with a K/M/G suffix."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = units.get(t[-1:], 1)
    try:
        value = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}': must be a byte count >= 1 (e.g. 4G, 500M)")
    return value


def add_max_bytes_arg(p: argparse.ArgumentParser) -> None:
    from ..io import DEFAULT_MAX_BYTES

    p.add_argument(
        "--max-bytes",
        type=_byte_count,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help="refuse a file declaring more than N bytes of tensors, before allocating "
        "(default: 2G; K/M/G suffixes)",
    )


def _table(title: str, headers: list[str], rows: list[list]) -> None:
    print_table(title, headers, rows)


def _print_report(report, title: str, streams: bool = False) -> None:
    headers, rows = report.rows()
    _table(title, headers, rows)
    out.print(
        "scheme: sparse = codebook + relative-index positions, codes = codebook + a code per "
        "element, context = codebook + context-coded significance map and codes (i H: map, "
        "class maps and tables per nonzero), sparse32/sparse16 = fp32/fp16 values (byte planes, "
        "entropy-coded) at relative-index positions, dense/dense16 = plain fp32/fp16 values, "
        "pq = product quantization; w/i = weight-code/index bits per code (P+Q fixed width, H "
        "entropy-coded; sparse32/16: bits per value); b = index bits; fill = filler entries",
        highlight=False,
        style="dim",
    )
    if streams and any(t.streams for t in report.tensors):
        srows = []
        for t in report.tensors:
            for s in t.streams:
                srows.append(
                    [
                        t.name,
                        s.role,
                        s.codec,
                        s.symbols,
                        s.alphabet,
                        round(s.entropy, 3),
                        round(s.bits_per_symbol, 3),
                        s.payload_bits,
                        s.table_bits,
                    ]
                )
        _table(
            "coded streams (entropy H and spent bits per symbol)",
            ["name", "role", "codec", "symbols", "alphabet", "H", "bits/sym", "payload", "table"],
            srows,
        )
    out.print(
        f"total {report.total_bytes:,} bytes (header {report.header_bytes:,}, metadata "
        f"{report.metadata_bytes:,}); dense {report.original_bytes:,} bytes -> "
        f"[bold]{report.ratio:.2f}x[/bold] smaller",
        highlight=False,
    )


def cmd_encode(args: argparse.Namespace) -> int:
    from ..io import EncodeConfig, checkpoint_metadata, save_compressed

    if args.out.suffix != ".ncz":
        raise ValueError(f"--out={str(args.out)!r}: must end in .ncz")
    auto = "not with --auto-index-bits (every width in [2, 12] is tried)"
    refuse_inapplicable(
        args,
        {
            "index_bits_conv": (not args.auto_index_bits, auto),
            "index_bits_fc": (not args.auto_index_bits, auto),
        },
    )
    config = EncodeConfig(
        codec=args.codec,
        layout=args.layout,
        index_bits_conv=args.index_bits_conv,
        index_bits_fc=args.index_bits_fc,
        auto_index_bits=args.auto_index_bits,
        codebook_dtype=args.codebook_dtype,
        dense_dtype=args.dense_dtype,
        max_codebook_bits=args.max_codebook_bits,
    )
    model, sidecar = open_model(args.checkpoint, args)
    report = save_compressed(
        model,
        args.out,
        config,
        checkpoint_metadata(sidecar, history=args.history),
        progress=RichProgress(enabled=not args.quiet),
    )
    if args.json:
        print_json({"file": str(args.out), **report.to_dict()})
    else:
        _print_report(report, f"{args.out}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from ..io import ArchitectureMissing, decode_to_checkpoint
    from .common import build_from_factory

    # --- Hugging Face folders (nncompress.cli.hf) ---
    if args.hf_out is not None:
        from .hf import cmd_decode_hf

        return cmd_decode_hf(args)
    # --- end Hugging Face ---
    if args.out is None:
        raise ValueError("decode: give --out (a checkpoint) or --hf-out (a Hugging Face folder)")
    try:
        model = build_from_factory(args.model_factory) if args.model_factory else None
        path = decode_to_checkpoint(args.file, args.out, model=model, max_bytes=args.max_bytes)
    except ArchitectureMissing as exc:
        raise ValueError(
            f"'{args.file}': {exc}"
            + (f" (e.g. a function returning a fresh {exc.class_name})" if exc.class_name else "")
        ) from exc
    out.print(f"wrote {path} (+ {path.with_suffix('.json').name})", highlight=False)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..io import inspect_file

    report = inspect_file(args.file, max_bytes=args.max_bytes)
    if args.json:
        print_json({"file": str(args.file), **report.to_dict()})
    else:
        _print_report(report, f"{args.file}", streams=args.streams)
    return 0
