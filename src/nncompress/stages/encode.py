"""Recipe stage ``encode``: write the model as ``DIR/model.ncz`` (Deep Compression stage 3).

The model's parametrizations (pruning masks, shared-weight codebooks, product-quantized
codebooks, whose layers the file then stores with the ``pq`` scheme) are folded into plain
weights, the weights are rounded exactly as the file will store them
(:func:`nncompress.io.round_for_storage_`; a no-op with fp32 codebooks), and the result is
written with :func:`nncompress.io.save_compressed`. The stage then *replaces* the context's
model by that rounded plain model, so what the runner evaluates after this stage is what the
file holds; the runner also decodes the file into a fresh model and evaluates that.

The file's metadata is the checkpoint sidecar content (architecture, dataset, metrics,
nncompress version) so ``nncompress decode`` can rebuild the model; the per-epoch training
history is left out to keep small files small.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ..core.modules import folded_copy
from ..io import EncodeConfig, pq_block_hints, round_for_storage_, save_compressed
from ..io.checkpoint import checkpoint_metadata, model_from_metadata
from .base import StageConfig, StageContext, stage_config

__all__ = ["EncodeStageConfig", "decode_to_model", "layer_table", "run_encode_stage"]


@stage_config(EncodeConfig)
class EncodeStageConfig(StageConfig):
    """The stage's options are exactly the container's :class:`~nncompress.io.EncodeConfig`
    (codec, index bits, fp16 codebooks...)."""


NCZ_NAME = "model.ncz"


def _metadata(ctx: StageContext, model: nn.Module) -> dict[str, Any]:
    from .. import __version__
    from ..engine.modspec import describe_architecture

    arch = describe_architecture(model, model_name=ctx.model_name, model_kwargs=ctx.model_kwargs)

    sidecar = {
        "architecture": arch,
        "dataset": ctx.splits.describe(),
        "nncompress_version": __version__,
    }
    return checkpoint_metadata(sidecar)


def run_encode_stage(ctx: StageContext, config: EncodeStageConfig) -> dict[str, Any]:
    encode = config.algorithm if isinstance(config, StageConfig) else config
    hints = pq_block_hints(ctx.model)  # product-quantized layers: stored with their own d
    if hints:
        encode = dataclasses.replace(encode, pq_block_size={**hints, **encode.pq_block_size})
    plain = folded_copy(ctx.model)
    changes = round_for_storage_(plain, encode)
    path = Path(ctx.out_dir) / NCZ_NAME
    report = save_compressed(plain, path, encode, _metadata(ctx, plain), progress=ctx.progress)
    ctx.model = plain
    ctx.artifacts["ncz"] = path
    out = report.to_dict()
    out["file"] = path.name
    out["max_rounding_change"] = max(changes.values(), default=0.0)
    return out


def decode_to_model(path: str | Path) -> nn.Module:
    """A fresh model filled from a ``.ncz`` file (architecture from the file's metadata), in
    eval mode."""
    from ..io import decode_file

    state, metadata = decode_file(path)
    model, _ = model_from_metadata(metadata, state)
    model.load_state_dict(state, strict=True)
    return copy.deepcopy(model).eval()


def layer_table(encode_report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer rows in the layout of Deep Compression Tables 2-3, from an EncodeReport dict.

    For each weight tensor (codebook scheme, or 2+ dims): weights, kept %, weight bits per
    nonzero after P+Q (fixed ``ceil(log2 k)``) and after H (coded), index bits per nonzero after
    P+Q (fixed ``b``, fillers included) and after H, and the compression rate of the layer
    after P+Q (fixed-width bits + codebook) and after P+Q+H (bytes in the file). A last row
    ``total`` covers the whole file (biases, header and metadata included).
    """
    rows = []
    tensors = encode_report.get("tensors", [])
    for t in tensors:
        if t["scheme"] != "codebook" and len(t["shape"]) < 2:
            continue
        name = t["name"][: -len(".weight")] if t["name"].endswith(".weight") else t["name"]
        sparse = t.get("layout") == "sparse"
        coded = t["scheme"] in ("codebook", "pq")
        if coded:
            pq_bits = t["weight_bits_pq"] + t["index_bits_pq"] + t["codebook_bits"]
        else:
            pq_bits = t["dense_bits"]
        rows.append(
            {
                "name": name,
                "params": t["numel"],
                "kept_percent": 100.0 * t["kept"],
                "scheme": t["scheme"]
                if t["scheme"] in ("dense", "pq")
                else f"codebook-{t['layout']}",
                "k": t.get("codebook_size") or None,
                "weight_bits_pq": t["weight_bits_per_code_pq"] if coded else None,
                "weight_bits_h": t["weight_bits_per_code"] if coded else None,
                "index_bits_pq": t["index_bits_per_nz_pq"] if sparse else None,
                "index_bits_h": t["index_bits_per_nz"] if sparse else None,
                "rate_pq": t["original_bits"] / pq_bits if pq_bits else None,
                "rate_h": t["compression"],
                "bytes": t["total_bytes"],
            }
        )
    if tensors:
        orig = sum(t["original_bits"] for t in tensors)
        numel = sum(t["numel"] for t in tensors)
        nnz = sum(t["nonzeros"] for t in tensors)
        overhead = 8 * (
            encode_report["prefix_bytes"]
            + encode_report["header_bytes"]
            + encode_report["metadata_bytes"]
        )
        pq = overhead + sum(
            (t["weight_bits_pq"] + t["index_bits_pq"] + t["codebook_bits"])
            if t["scheme"] in ("codebook", "pq")
            else 8 * t["total_bytes"]
            for t in tensors
        )
        rows.append(
            {
                "name": "total",
                "params": numel,
                "kept_percent": 100.0 * nnz / numel if numel else 0.0,
                "scheme": "",
                "k": None,
                "weight_bits_pq": None,
                "weight_bits_h": None,
                "index_bits_pq": None,
                "index_bits_h": None,
                "rate_pq": orig / pq if pq else None,
                "rate_h": encode_report["ratio"],
                "bytes": encode_report["total_bytes"],
            }
        )
    return rows
