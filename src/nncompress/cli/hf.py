"""Hugging Face folder commands: ``compress`` (a folder in, a ``.ncz`` out, bits chosen under a
size budget), plus the HF branches of ``eval`` (fidelity to the original) and ``decode``
(``--hf-out``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import RichProgress, add_json_arg, add_quiet_arg, out, print_json


def existing_path(value: str) -> Path:
    """argparse type: an existing file or folder."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"'{value}' does not exist")
    return path


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}': comma-separated integers expected") from exc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a Hugging Face model folder into a .ncz (bits chosen for a size budget)",
        description="Load a local Hugging Face folder (config.json + model.safetensors, "
        "offline), quantize its Linear / Conv1D / Embedding weights (GPTQ on calibration text "
        "tokenised with the folder's tokenizer) and write OUT/model.ncz and OUT/compress.json. "
        "With --target-ratio or --target-size the per-layer bits come from a sensitivity scan "
        "and a knapsack that meets the size exactly; LayerNorms and biases are stored in fp16.",
    )
    p.add_argument("model", type=existing_path, help="Hugging Face model folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument(
        "--calibration",
        required=True,
        type=existing_path,
        help="plain-text file or folder, one example per line",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-ratio", type=float, help="dense fp32 size / file size")
    target.add_argument("--target-size", type=int, help="file size in bytes")
    p.add_argument("--bits", type=int, default=4, help="bits without a target (default: 4)")
    p.add_argument(
        "--bit-choices",
        type=_bits_list,
        default=(2, 3, 4, 5, 6, 8, 16),
        help="widths the allocation may choose; 16 = keep in fp16 (default: 2,3,4,5,6,8,16)",
    )
    p.add_argument("--group-size", type=int, default=128, help="columns per scale (default 128)")
    p.add_argument("--symmetric", action="store_true", help="symmetric codes (no zero points)")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="default: gptq")
    p.add_argument("--no-embeddings", action="store_true", help="leave embeddings in fp16")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    p.add_argument(
        "--examples", type=int, default=128, help="calibration examples used (default 128)"
    )
    p.add_argument(
        "--sensitivity-batches", type=int, default=4, help="batches of the scan (default 4)"
    )
    p.add_argument("--hf-out", type=Path, help="also write the decoded Hugging Face folder here")
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_compress)


def _check_out(path: Path, flag: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{flag} '{path}': exists and is not an empty folder; not overwritten")


def cmd_compress(args: argparse.Namespace) -> int:
    from ..core.files import atomic_write_text
    from ..data.text import text_batches
    from ..io import EncodeConfig, encode_state_dict, save_compressed
    from ..io.hf import decode_to_hf_folder, hf_metadata, is_hf_folder, load_hf_folder
    from ..quant.mixed import MixedPrecisionConfig, quantize_mixed_
    from ..quant.weight_only import WeightOnlyConfig, quantize_weights_

    if not is_hf_folder(args.model):
        raise ValueError(f"'{args.model}': not a Hugging Face folder (config.json + safetensors)")
    _check_out(args.out, "--out")
    if args.hf_out is not None:
        _check_out(args.hf_out, "--hf-out")
    qcfg = WeightOnlyConfig(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=args.symmetric,
        method=args.method,
        embeddings=not args.no_embeddings,
        calibration_batches=None,
    )
    mcfg = None
    if args.target_ratio is not None or args.target_size is not None:
        mcfg = MixedPrecisionConfig(
            bit_choices=args.bit_choices, quant=qcfg, sensitivity_batches=args.sensitivity_batches
        )
    progress = RichProgress(not args.quiet)
    start = time.perf_counter()
    model, config = load_hf_folder(args.model)
    calib = text_batches(
        args.calibration,
        args.model,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_examples=args.examples,
    )
    meta = hf_metadata(model, config)
    plan = None
    if mcfg is not None:
        plan, report = quantize_mixed_(
            model,
            calib,
            mcfg,
            target_bytes=args.target_size,
            target_ratio=args.target_ratio,
            metadata=meta,
            progress=progress,
            measure=lambda m: len(encode_state_dict(m, EncodeConfig(dense_dtype="fp16"), meta)[0]),
        )
    else:
        report = quantize_weights_(model, qcfg, calib, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    enc = save_compressed(
        model, args.out / "model.ncz", EncodeConfig(dense_dtype="fp16"), meta, progress=progress
    )
    summary = {
        "source": str(args.model),
        "file": str(args.out / "model.ncz"),
        "bytes": enc.total_bytes,
        "ratio": enc.ratio,
        "budget": None if plan is None else plan.budget,
        "bits": {r.name: r.bits for r in report.layers},
        "seconds": time.perf_counter() - start,
        "quant": qcfg.to_dict(),
    }
    if plan is not None:
        summary["plan"] = plan.to_dict()
    atomic_write_text(args.out / "compress.json", json.dumps(summary, indent=2, sort_keys=True))
    if args.hf_out is not None:
        decode_to_hf_folder(args.out / "model.ncz", args.hf_out, tokenizer_from=args.model)
    if args.json:
        print_json(summary)
    else:
        target = f" (budget {plan.budget:,})" if plan is not None else ""
        widths = sorted(set(summary["bits"].values()))
        out.print(
            f"{args.out / 'model.ncz'}: {enc.total_bytes:,} bytes{target}, {enc.ratio:.2f}x "
            f"smaller than fp32; widths used {widths}; {summary['seconds']:.1f} s",
            highlight=False,
        )
    return 0


def _load_any(path: Path):
    """A Hugging Face folder or a .ncz written from one, as a model in eval mode."""
    from ..io import decode_file
    from ..io.hf import is_hf_folder, load_hf_folder, model_from_hf_metadata

    if is_hf_folder(path):
        return load_hf_folder(path)[0]
    state, metadata = decode_file(path)
    model = model_from_hf_metadata(metadata)
    model.load_state_dict(state, strict=True)
    return model.eval()


def cmd_eval_hf(args: argparse.Namespace) -> int:
    """``nncompress eval MODEL --reference HF_DIR --text FILE``: fidelity to the original."""
    from ..data.text import text_batches
    from ..io.hf import is_hf_folder, load_hf_folder
    from ..stats.fidelity import fidelity

    if args.reference is None or args.text is None:
        raise ValueError(
            "eval of a Hugging Face model: needs --reference (the original folder) and --text "
            "(held-out plain text, one example per line)"
        )
    if not is_hf_folder(args.reference):
        raise ValueError(f"--reference '{args.reference}': not a Hugging Face folder")
    reference, _ = load_hf_folder(args.reference)
    model = _load_any(args.checkpoint)
    batches = text_batches(
        args.text, args.reference, batch_size=8, max_length=128, max_examples=args.examples
    )
    res = fidelity(reference, model, batches, progress=RichProgress(not args.quiet))
    if args.json:
        print_json(res)
    else:
        out.print("  ".join(f"{k} {v:.6g}" for k, v in res.items()), highlight=False)
    return 0


def cmd_decode_hf(args: argparse.Namespace) -> int:
    from ..io.hf import decode_to_hf_folder

    path = decode_to_hf_folder(args.file, args.hf_out, tokenizer_from=args.tokenizer_from)
    out.print(f"wrote {path} (AutoModel.from_pretrained loads it)", highlight=False)
    return 0
