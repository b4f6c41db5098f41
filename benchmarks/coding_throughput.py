"""Entropy-coder throughput and efficiency on a large synthetic layer (Deep Compression stage 3).

A 10-million-weight layer (2500 x 4000) of N(0, 1) weights is pruned by magnitude to ~10% kept
and the survivors are shared among 32 linearly spaced centroids (5-bit codes; the code
histogram is skewed: most survivors sit just above the pruning threshold). We time, for the
canonical Huffman, ANS (constriction) and fixed-width ("raw") codecs:

* the weight-code stream of the sparse layer (one code per nonzero, ~1M symbols),
* its relative-index stream (b = 5 bits, fillers included, ~1.1M symbols),
* the dense code stream of the whole layer (zero as a code: 10M symbols),

reporting symbols per second (median of repeats; the machine is shared, so timings are noisy),
the empirical entropy and the bits actually spent per symbol. Then the whole layer through the
.ncz container, against the same codes stored densely as uint8 and compressed with gzip -9,
zstd -19 and xz -9 (``compare_general_purpose``, reusable by other benchmarks).

Run from benchmarks/:  python coding_throughput.py [--quick]  (--smoke: a 200 x 250 layer)
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import statistics
import time

import numpy as np
import torch

__all__ = ["compare_general_purpose", "synthetic_layer"]


def compare_general_purpose(codes: np.ndarray, side: bytes = b"") -> dict[str, int]:
    """Bytes of ``codes`` stored densely as uint8 (plus ``side`` data) and compressed by
    general-purpose tools.

    This is what peers (e.g. TFMOT's weight-clustering guide) tell users to do with cluster
    indices: store them as a dense uint8 array and zip it. ``codes`` must be integers in
    [0, 255] (one per weight, pruned weights included with their own code). ``side`` is the
    side data the file also needs (e.g. the codebook, in the precision our file stores it), so
    that every row carries the same information.

    Returns
    -------
    dict with ``uint8`` (raw size), ``gzip-9``, ``zstd-19`` (zstandard package) and ``xz-9``
    (lzma preset 9) compressed sizes in bytes.
    """
    import zstandard

    c = np.asarray(codes)
    if c.size and (c.dtype.kind not in "ui" or int(c.min()) < 0 or int(c.max()) > 255):
        raise ValueError("codes: must be integers in [0, 255] to be stored as uint8")
    raw = c.astype(np.uint8).tobytes() + side
    return {
        "uint8": len(raw),
        "gzip-9": len(gzip.compress(raw, compresslevel=9, mtime=0)),
        "zstd-19": len(zstandard.ZstdCompressor(level=19).compress(raw)),
        "xz-9": len(lzma.compress(raw, preset=9)),
    }


def synthetic_layer(
    shape: tuple[int, int] = (2500, 4000), keep: float = 0.1, bits: int = 5, seed: int = 0
) -> torch.Tensor:
    """N(0,1) weights pruned by magnitude to ``keep`` and shared among 2**bits centroids, half
    spaced linearly over the negative survivors and half over the positive ones (linear
    initialisation per sign, so every code is used; no retraining)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)  # (rows, cols)
    thr = np.quantile(np.abs(w), 1 - keep)
    mask = np.abs(w) > thr
    nz = w[mask]
    half = 2 ** (bits - 1)
    centroids = np.concatenate(
        [np.linspace(nz.min(), -thr, half), np.linspace(thr, nz.max(), half)]
    ).astype(np.float32)  # (k,) ascending
    idx = np.clip(np.searchsorted(centroids, nz), 1, len(centroids) - 1)
    left_closer = (nz - centroids[idx - 1]) < (centroids[idx] - nz)
    idx = idx - left_closer  # nearest centroid
    out = np.zeros_like(w)
    out[mask] = centroids[idx]
    return torch.from_numpy(out)


# Han et al. 2015/2016: fraction of weights kept per layer, and shared-weight bits
PAPER_LENET = {
    "lenet-300-100": {"fc1": (0.08, 5), "fc2": (0.09, 5), "fc3": (0.26, 5)},
    "lenet-5": {"conv1": (0.66, 8), "conv2": (0.12, 8), "fc1": (0.08, 5), "fc2": (0.19, 5)},
}


def paper_like_lenet(name: str) -> dict[str, torch.Tensor]:
    """The baseline's state dict with each weight pruned by magnitude to the paper's kept
    fraction and its survivors snapped to 2**bits linear centroids (no retraining: this is a
    storage study, the positions and code histograms are what matter)."""
    from _common import baseline
    from nncompress.engine import load_checkpoint

    model, _ = load_checkpoint(baseline(name))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for layer, (keep, bits) in PAPER_LENET[name].items():
        w = sd[f"{layer}.weight"].numpy()
        thr = np.quantile(np.abs(w), 1 - keep)
        mask = np.abs(w) > thr
        nz = w[mask]
        centroids = np.linspace(nz.min(), nz.max(), 2**bits).astype(np.float32)  # (k,)
        idx = np.abs(nz[:, None] - centroids[None, :]).argmin(1)  # (nnz,)
        out = np.zeros_like(w)
        out[mask] = centroids[idx]
        sd[f"{layer}.weight"] = torch.from_numpy(out)
    return sd


def order_study() -> tuple[list[dict], str]:
    """Bytes and fillers of each LeNet layer flattened row-major (C) vs column-major (F)."""
    from nncompress.io import EncodeConfig, encode_state_dict

    rows = []
    for name in PAPER_LENET:
        sd = paper_like_lenet(name)
        for codec in ("raw", "huffman"):
            reps = {
                order: encode_state_dict(
                    sd,
                    EncodeConfig(
                        codec=codec,
                        order=order,
                        layout="sparse" if order != "auto" else "auto",
                        scheme=_force_codebook(name),
                    ),
                )[1]
                for order in ("C", "F", "auto")
            }
            for layer in PAPER_LENET[name]:
                t = {o: r.tensor(f"{layer}.weight") for o, r in reps.items()}
                rows.append(
                    {
                        "model": name,
                        "layer": layer,
                        "codec": codec,
                        "b": t["C"].index_bits,
                        "kept_percent": 100 * t["C"].kept,
                        "fillers_C": t["C"].fillers,
                        "fillers_F": t["F"].fillers,
                        "index_bits_C": t["C"].index_bits_coded,
                        "index_bits_F": t["F"].index_bits_coded,
                        "bytes_C": t["C"].total_bytes,
                        "bytes_F": t["F"].total_bytes,
                        "auto": (
                            f"sparse/{t['auto'].order}"
                            if t["auto"].layout == "sparse"
                            else t["auto"].layout
                        ),
                    }
                )
    md = [
        "| model | layer | codec | b | kept % | fillers C | fillers F | bytes C | bytes F "
        "| auto picks |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['model']} | {r['layer']} | {r['codec']} | {r['b']} | "
            f"{r['kept_percent']:.1f} | {r['fillers_C']:,} | {r['fillers_F']:,} | "
            f"{r['bytes_C']:,} | {r['bytes_F']:,} | {r['auto']} |"
        )
    return rows, "\n".join(md)


def _force_codebook(name: str) -> dict[str, str]:
    return {f"{layer}.weight": "codebook" for layer in PAPER_LENET[name]}


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_stream(name: str, symbols: np.ndarray, alphabet: int, repeats: int) -> list[dict]:
    from nncompress.coding import (
        AnsStream,
        HuffmanStream,
        ans_decode,
        ans_encode,
        empirical_entropy,
        huffman_decode,
        huffman_encode,
        pack_bits,
        unpack_bits,
    )

    n = int(symbols.size)
    h = empirical_entropy(symbols)
    width = max(1, (alphabet - 1).bit_length())
    rows = []
    codecs = {
        "huffman": (
            lambda: huffman_encode(symbols).to_bytes(),
            lambda b: huffman_decode(HuffmanStream.from_bytes(b)),
        ),
        # the whole stream in one Huffman block: the layout that made the old decoder take one
        # numpy step per symbol (issue 19); decoding must not depend on it
        "huffman, 1 block": (
            lambda: huffman_encode(symbols, block_size=n).to_bytes(),
            lambda b: huffman_decode(HuffmanStream.from_bytes(b)),
        ),
        "ans": (
            lambda: ans_encode(symbols).to_bytes(),
            lambda b: ans_decode(AnsStream.from_bytes(b)),
        ),
        "raw": (lambda: pack_bits(symbols, width), lambda b: unpack_bits(b, width, n)),
    }
    for codec, (enc, dec) in codecs.items():
        t_enc, data = _median_time(enc, repeats)
        t_dec, back = _median_time(lambda data=data, dec=dec: dec(data), repeats)
        if not np.array_equal(back, symbols):
            raise AssertionError(f"{name}/{codec}: round trip failed")
        rows.append(
            {
                "stream": name,
                "codec": codec,
                "symbols": n,
                "alphabet": alphabet,
                "entropy_bits_per_symbol": h,
                "bits_per_symbol": 8 * len(data) / n,
                "bytes": len(data),
                "encode_s": t_enc,
                "decode_s": t_dec,
                "encode_msym_per_s": n / t_enc / 1e6,
                "decode_msym_per_s": n / t_dec / 1e6,
            }
        )
    return rows


def bench_context(w: np.ndarray, codebook: np.ndarray, repeats: int) -> list[dict]:
    """The context coder (coding/context.py) on the whole layer: map + codes in one stream.
    Throughput counted in weights decoded per second (every position of the significance map
    and every code) and in coded symbols per second (map symbols of g bits + codes)."""
    from nncompress.coding.context import (
        ContextConfig,
        best_context_config,
        context_decode,
        context_encode,
    )

    codes = np.full(w.shape, -1, dtype=np.int64)
    nz = w != 0
    codes[nz] = np.searchsorted(codebook, w[nz])
    k, nnz = len(codebook), int(nz.sum())
    t_search, (best, _) = _median_time(lambda: best_context_config(codes, k), 1)
    rows = []
    for label, cfg in (("chosen " + _cfg_text(best), best), ("g=1 (binary flags)", ContextConfig(
            best.row_classes, best.col_classes, best.code_context, 1))):  # fmt: skip
        t_enc, stream = _median_time(lambda cfg=cfg: context_encode(codes, k, cfg), repeats)
        data = stream.to_bytes()
        t_dec, (mask, vals, _) = _median_time(
            lambda data=data: context_decode(data, *w.shape, k, nnz), repeats
        )
        if not (np.array_equal(mask, nz) and np.array_equal(vals, codes[nz])):
            raise AssertionError("context coder: round trip failed")
        n_sym = -(-w.shape[1] // cfg.map_bits) * w.shape[0] + nnz
        rows.append(
            {
                "model": label,
                "bytes": len(data),
                "bits_per_nonzero": 8 * len(data) / nnz,
                "search_s": t_search,
                "encode_s": t_enc,
                "decode_s": t_dec,
                "decode_mweights_per_s": (w.size + nnz) / t_dec / 1e6,
                "decode_msym_per_s": n_sym / t_dec / 1e6,
            }
        )
    return rows


def _cfg_text(c) -> str:
    return f"({c.row_classes}x{c.col_classes} classes, codes by {c.code_context}, g={c.map_bits})"


def _layout_text(f: dict) -> str:
    if f["layout"] == "sparse":
        return f"sparse, order {f['order']}, {f['fillers']:,} fillers"
    return f"{f['layout']} layout"


def markdown(
    shape, flat, mask, codebook, repeats, rows, files, general, order_md, ctx_rows
) -> list[str]:
    from nncompress.io import EncodeConfig

    md = [
        f"Synthetic layer {shape[0]}x{shape[1]} = {flat.size:,} weights, N(0,1) pruned by "
        f"magnitude to {100 * mask.mean():.1f}% kept, {len(codebook)} linear centroids "
        f"(5-bit codes). Timings are medians of {repeats} run(s) on a shared 2-core machine "
        f"(other jobs running: noisy; load average {os.getloadavg()[0]:.1f} at the end), one "
        "thread.",
        "",
        "| stream | codec | symbols | entropy (bits/sym) | spent (bits/sym) | encode Msym/s "
        "| decode Msym/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['stream']} | {r['codec']} | {r['symbols']:,} | "
            f"{r['entropy_bits_per_symbol']:.3f} | {r['bits_per_symbol']:.3f} | "
            f"{r['encode_msym_per_s']:.2f} | {r['decode_msym_per_s']:.2f} |"
        )
    md += [
        "",
        "Context coder (coding/context.py) on the whole layer: significance map and codes in one "
        "stream. 'weights/s' counts every position of the map plus every code decoded; "
        "'coded sym/s' the symbols the ANS decoder produced (map symbols of g bits, codes).",
        "",
        "| model | bytes | bits/nonzero | search s | encode s | decode s | decode M weights/s "
        "| decode M coded sym/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ctx_rows:
        md.append(
            f"| {r['model']} | {r['bytes']:,} | {r['bits_per_nonzero']:.3f} | {r['search_s']:.2f} "
            f"| {r['encode_s']:.2f} | {r['decode_s']:.3f} | {r['decode_mweights_per_s']:.1f} | "
            f"{r['decode_msym_per_s']:.1f} |"
        )
    md += [
        "",
        "Whole layer, same weights: our .ncz file vs the dense codes (zero = code 0) as uint8 "
        f"plus the same {len(codebook)}-entry codebook our file stores "
        f"({EncodeConfig().codebook_dtype}), compressed by general-purpose tools.",
        "",
        "| storage | bytes | x vs fp32 | encode s | decode s |",
        "|---|---:|---:|---:|---:|",
        f"| dense fp32 | {4 * flat.size:,} | 1.0 | | |",
    ]
    for f in files:
        md.append(
            f"| .ncz {f['codec']} ({_layout_text(f)})"
            f" | {f['bytes']:,} | {4 * flat.size / f['bytes']:.1f} | {f['encode_s']:.2f} | "
            f"{f['decode_s']:.2f} |"
        )
    for k, v in general.items():
        md.append(f"| codes + codebook as {k} | {v:,} | {4 * flat.size / v:.1f} | | |")
    md += [
        "",
        "## Flattening order on LeNet",
        "",
        "Baseline Fashion-MNIST LeNets pruned by magnitude to the paper's per-layer kept "
        "fractions and snapped to 2**bits linear centroids (8 bits conv, 5 bits FC; no "
        "retraining), sparse layout forced: relative-index fillers and layer bytes when the "
        "weight is flattened row-major (C: CSR for a Linear (out, in) weight; for a conv "
        "(out, in, kh, kw)) or column-major (F: CSC; for a conv (kw, kh, in, out)). 'auto "
        "picks' is the layout/order the encoder chooses by size when free.",
        "",
        order_md,
    ]
    return md


def main(argv: list[str] | None = None) -> None:
    from _common import add_protocol_args, setup, write_result
    from nncompress.coding import relative_index_encode
    from nncompress.io import EncodeConfig, decode_bytes, encode_state_dict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1M weights instead of 10M, 1 repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    add_protocol_args(p, seeds="0")
    args = p.parse_args(argv)
    setup(args)
    t_start = time.perf_counter()
    shape = (1000, 1000) if args.quick else (2500, 4000)
    if args.smoke:
        shape = (200, 250)
    repeats = 1 if args.quick or args.smoke else args.repeats

    w = synthetic_layer(shape)
    flat = w.numpy().ravel()
    mask = flat != 0
    codebook = np.unique(flat[mask])  # (k,) sorted
    codes = np.searchsorted(codebook, flat[mask])  # (nnz,) per-nonzero codes
    dense_codes = np.zeros(flat.size, dtype=np.int64)  # zero = code 0, centroids 1..k
    dense_codes[mask] = codes + 1
    ri = relative_index_encode(mask, 5)

    rows = []
    rows += bench_stream("weight codes (sparse)", codes, len(codebook), repeats)
    rows += bench_stream("relative index b=5", ri.entries, 32, repeats)
    rows += bench_stream("dense codes (whole layer)", dense_codes, len(codebook) + 1, repeats)

    ctx_rows = bench_context(flat.reshape(shape), codebook, repeats)
    files = []
    for codec in ("huffman", "ans", "raw", "context"):
        cfg = EncodeConfig(codec=codec)
        t_enc, (data, report) = _median_time(lambda cfg=cfg: encode_state_dict({"w": w}, cfg), 1)
        t_dec, (state, _) = _median_time(lambda data=data: decode_bytes(data), 1)
        if not torch.equal(state["w"], w):
            raise AssertionError(f"container/{codec}: round trip failed")
        t = report.tensor("w")
        files.append(
            {
                "codec": codec,
                "bytes": len(data),
                "ratio_vs_fp32": report.ratio,
                "layout": t.layout,
                "order": t.order,
                "fillers": t.fillers,
                "encode_s": t_enc,
                "decode_s": t_dec,
            }
        )
    # the same side data as our file: the codebook in the precision the .ncz stores it
    cb_dtype = np.float16 if EncodeConfig().codebook_dtype == "fp16" else np.float32
    general = compare_general_purpose(dense_codes, codebook.astype(cb_dtype).tobytes())
    order_rows, order_md = order_study()

    md = markdown(shape, flat, mask, codebook, repeats, rows, files, general, order_md, ctx_rows)
    write_result(
        "coding_throughput",
        {
            "shape": list(shape),
            "streams": rows,
            "files": files,
            "context": ctx_rows,
            "general_purpose": general,
            "lenet_order": order_rows,
            "compute_s": time.perf_counter() - t_start,
        },
        "\n".join(md),
        None if argv is None else ["coding_throughput.py", *argv],
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
