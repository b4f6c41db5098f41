"""Storage studies of the Deep Compression benchmark (deep_compression.py): the same pruned +
clustered weights stored other ways, re-encoded with other .ncz options, and our 1-D k-means
against scikit-learn's KMeans."""

from __future__ import annotations

import gzip
import io
import lzma
import time
from pathlib import Path

import numpy as np
import torch

from nncompress.engine import evaluate, load_checkpoint

# ------------------------------------------------------------------ other storage formats


def _general_purpose(blob: bytes) -> dict[str, int]:
    import zstandard

    return {
        "gzip -9": len(gzip.compress(blob, compresslevel=9, mtime=0)),
        "zstd -19": len(zstandard.ZstdCompressor(level=19).compress(blob)),
        "xz -9": len(lzma.compress(blob, preset=9)),
    }


def other_formats(ckpt: Path, side_dtype: str) -> dict[str, int]:
    """Sizes of the same pruned + clustered weights stored other ways.

    - torch.save of the (dense fp32) state dict;
    - the cluster indices as dense uint8 arrays (0 = pruned, 1..k = centroid) plus the
      codebooks and the other tensors (biases) in ``side_dtype`` — the same precision our .ncz
      stores them in — raw and compressed with gzip -9 / zstd -19 / xz -9 (the advice of e.g.
      TFMOT for clustered models).
    """
    model, _ = load_checkpoint(ckpt)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    sizes = {"torch.save (fp32 dense)": buf.getbuffer().nbytes}
    dt = np.float16 if side_dtype == "fp16" else np.float32
    parts = []
    for name, t in model.state_dict().items():
        a = t.detach().cpu().numpy()
        nz = a[a != 0]
        values = np.unique(nz)
        if name.endswith("weight") and a.ndim >= 2 and len(values) <= 255:
            codes = np.zeros(a.shape, dtype=np.uint8)
            codes[a != 0] = (np.searchsorted(values, nz) + 1).astype(np.uint8)
            parts += [codes.tobytes(), values.astype(dt).tobytes()]
        else:
            parts.append(a.astype(dt).tobytes())
    blob = b"".join(parts)
    sizes[f"uint8 indices + {side_dtype} side data, raw"] = len(blob)
    for k, v in _general_purpose(blob).items():
        sizes[f"uint8 indices + {side_dtype} side data + {k}"] = v
    return sizes


# ------------------------------------------------------------------ re-encodings

FP16 = {"codebook_dtype": "fp16", "dense_dtype": "fp16"}
REENCODINGS = {
    "huffman, fp32 codebooks/biases, b=5": {},
    "huffman, fp16": FP16,
    "huffman, fp16, b_fc=7": {**FP16, "index_bits_fc": 7},
    "ans, fp16, b_fc=7": {**FP16, "index_bits_fc": 7, "codec": "ans"},
}


def reencode(ckpt: Path, ncz: Path, splits) -> list[dict]:
    """Encode the same pruned + shared weights with other storage options; decode each file
    and evaluate the decoded model (held-out, then test once: fp16 rounding can change it)."""
    from nncompress.io import (
        EncodeConfig,
        decode_bytes,
        decode_file,
        encode_state_dict,
        round_for_storage_,
    )

    metadata = decode_file(ncz)[1]  # same metadata as the run's file
    rows = []
    for label, opts in REENCODINGS.items():
        model, _ = load_checkpoint(ckpt)
        cfg = EncodeConfig(**opts)
        round_for_storage_(model, cfg)
        t0 = time.perf_counter()
        data, _ = encode_state_dict(model, cfg, metadata)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, _ = decode_bytes(data)
        t_dec = time.perf_counter() - t0
        model.load_state_dict(state)
        rows.append(
            {
                "encoding": label,
                "bytes": len(data),
                "val_accuracy": evaluate(model, splits.loader("val", 1000))["accuracy"],
                "test_accuracy": evaluate(model, splits.loader("test", 1000))["accuracy"],
                "encode_s": t_enc,
                "decode_s": t_dec,
            }
        )
    return rows


# ------------------------------------------------------------------ k-means vs scikit-learn


def kmeans_vs_sklearn(ckpt: Path, layer: str, bits: int) -> dict:
    """Our 1-D k-means and scikit-learn's KMeans, same data, same linear init, n_init=1,
    max_iter=300, tol=0: wall times, inertia, and the largest centroid difference."""
    from sklearn.cluster import KMeans

    from nncompress.quant import kmeans_1d

    model, _ = load_checkpoint(ckpt)
    w = model.get_submodule(layer).weight.detach().flatten()
    w = w[w != 0]
    x = w.double().numpy()
    k = min(2**bits, len(np.unique(x)))
    t0 = time.perf_counter()
    cb, labels = kmeans_1d(w, k, init="linear", max_iter=300)
    t_ours = time.perf_counter() - t0
    init = np.linspace(x.min(), x.max(), k)[:, None]
    t0 = time.perf_counter()
    km = KMeans(k, init=init, n_init=1, max_iter=300, tol=0.0).fit(x[:, None])
    t_sk = time.perf_counter() - t0
    ours_inertia = float(np.sum((x - cb.double().numpy()[labels.numpy()]) ** 2))
    ref = np.sort(km.cluster_centers_.ravel())
    ours = np.sort(cb.double().numpy())
    return {
        "layer": layer,
        "n": int(w.numel()),
        "k": k,
        "ours_s": t_ours,
        "sklearn_s": t_sk,
        "speedup": t_sk / t_ours,
        "ours_inertia": ours_inertia,
        "sklearn_inertia": float(km.inertia_),
        "inertia_ratio": ours_inertia / float(km.inertia_),
        "max_centroid_diff": float(np.max(np.abs(ours - ref))),
        "weight_range": float(x.max() - x.min()),
    }
