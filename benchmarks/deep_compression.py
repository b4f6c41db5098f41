"""Deep Compression (Han et al., ICLR 2016) on Fashion-MNIST: LeNet-300-100 and LeNet-5.

For each model, starting from the foundation's baseline checkpoint, runs the shipped recipe
(recipes/deep-compression-*.yaml without its `train` stage: prune -> share -> finetune ->
encode) and variants that push further, through the real pipeline (`run_recipe`): every
reported accuracy of a compressed model is that of the decoded .ncz file on the test split,
every size the file's bytes on disk. Prints our per-layer table beside the paper's Tables 2-3,
the same pruned+clustered weights stored other ways (torch.save, uint8 cluster indices +
gzip / zstd -19 / xz -9), the wall time of every stage, and our 1-D k-means against
scikit-learn's KMeans (same init, same data).

Run from benchmarks/:  ../.venv/bin/python deep_compression.py [--models lenet-300-100 lenet-5]
Runs resume: a finished variant is not recomputed (delete out/deep_compression to start over).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
import lzma
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import ROOT, baseline, write_result
from nncompress.engine import evaluate, load_checkpoint
from nncompress.recipe import layer_table_markdown, load_recipe, run_recipe

OUT = ROOT / "out" / "deep_compression"
RECIPES = ROOT.parent / "recipes"

# Deep Compression, Tables 2 and 3 (MNIST): weights kept %, weight bits P+Q, weight bits H,
# index bits P+Q, index bits H, compression rate P+Q, compression rate P+Q+H.
PAPER = {
    "lenet-300-100": {
        "fc1": (8, 6, 4.4, 5, 3.7, "32x", "40x"),
        "fc2": (9, 6, 4.4, 5, 4.3, "26x", "40x"),
        "fc3": (26, 6, 4.3, 5, 3.2, "9x", "9x"),
        "total": (8, 6, 5.1, 5, 3.7, "31x", "40x"),
    },
    "lenet-5": {
        "conv1": (66, 8, 7.2, 5, 1.5, "2.5x", "2.7x"),
        "conv2": (12, 8, 7.2, 5, 3.9, "14x", "16x"),
        "fc1": (8, 5, 4.5, 5, 4.5, "36x", "41x"),
        "fc2": (19, 5, 5.2, 5, 3.7, "8x", "9x"),
        "total": (8, 5.3, 4.1, 5, 4.4, "33x", "39x"),
    },
}
PAPER_SUMMARY = {
    "lenet-300-100": "1070 KB -> 27 KB, 40x, error 1.64% -> 1.58% (MNIST)",
    "lenet-5": "1720 KB -> 44 KB, 39x, error 0.80% -> 0.74% (MNIST)",
}

# Variants: changes applied to the shipped recipe (stage index in the recipe without `train`:
# 0 prune, 1 share, 2 finetune, 3 encode).
FP16 = {"codebook_dtype": "fp16", "dense_dtype": "fp16"}
VARIANTS: dict[str, dict[str, dict]] = {
    "lenet-300-100": {
        "paper": {},
        "paper+fp16": {"encode": FP16},
        "5bit+fp16": {
            "prune": {"iterations": 4, "epochs": 4},
            "share": {"bits_fc": 5},
            "finetune": {"epochs": 4},
            "encode": FP16,
        },
        "5bit+fp16+ans": {
            "prune": {"iterations": 4, "epochs": 4},
            "share": {"bits_fc": 5},
            "finetune": {"epochs": 4},
            "encode": {**FP16, "codec": "ans"},
        },
        "sens-94%+4bit+ans": {
            "prune": {
                "sparsity": 0.94,
                "per_layer": {},
                "allocate": "sensitivity",
                "iterations": 4,
                "epochs": 4,
            },
            "share": {"bits_fc": 4},
            "finetune": {"epochs": 4},
            "encode": {**FP16, "codec": "ans"},
        },
    },
    "lenet-5": {
        "paper": {},
        "paper+fp16+ans": {"encode": {**FP16, "codec": "ans"}},
        "sens-95%+4bit+ans": {
            "prune": {
                "sparsity": 0.95,
                "per_layer": {},
                "allocate": "sensitivity",
                "iterations": 3,
                "epochs": 3,
            },
            "share": {"bits_fc": 4, "bits_conv": 6},
            "finetune": {"epochs": 2},
            "encode": {**FP16, "codec": "ans"},
        },
    },
}


def recipe_for(model: str, changes: dict[str, dict]) -> dict:
    data = yaml.safe_load((RECIPES / f"deep-compression-{model}.yaml").read_text())
    data.pop("model")
    data.pop("data")
    data["baseline"] = str(baseline(model))
    stages = [s for s in data["stages"] if s["stage"] != "train"]
    for s in stages:
        s.update(changes.get(s["stage"], {}))
        if s["stage"] == "prune" and "per_layer" in changes.get("prune", {}):
            s["per_layer"] = changes["prune"]["per_layer"]
    data["stages"] = stages
    return data


# ------------------------------------------------------------------ other storage formats


def _general_purpose(blob: bytes) -> dict[str, int]:
    import zstandard

    return {
        "gzip -9": len(gzip.compress(blob, compresslevel=9, mtime=0)),
        "zstd -19": len(zstandard.ZstdCompressor(level=19).compress(blob)),
        "xz -9": len(lzma.compress(blob, preset=9)),
    }


def other_formats(ckpt: Path) -> dict[str, int]:
    """Sizes of the same pruned + clustered weights stored other ways.

    - torch.save of the (dense fp32) state dict;
    - the cluster indices as dense uint8 arrays (0 = pruned, 1..k = centroid) plus fp32
      codebooks and biases, raw and compressed with gzip -9 / zstd -19 / xz -9 (the advice
      of e.g. TFMOT for clustered models).
    """
    model, _ = load_checkpoint(ckpt)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    sizes = {"torch.save (fp32 dense)": buf.getbuffer().nbytes}
    parts = []
    for name, t in model.state_dict().items():
        a = t.detach().cpu().numpy()
        nz = a[a != 0]
        values = np.unique(nz)
        if name.endswith("weight") and a.ndim >= 2 and len(values) <= 255:
            codes = np.zeros(a.shape, dtype=np.uint8)
            codes[a != 0] = (np.searchsorted(values, nz) + 1).astype(np.uint8)
            parts += [codes.tobytes(), values.astype(np.float32).tobytes()]
        else:
            parts.append(a.astype(np.float32).tobytes())
    blob = b"".join(parts)
    sizes["uint8 indices raw"] = len(blob)
    for k, v in _general_purpose(blob).items():
        sizes[f"uint8 indices + {k}"] = v
    return sizes


# ------------------------------------------------------------------ k-means vs scikit-learn


def kmeans_vs_sklearn(ckpt: Path, layer: str, bits: int, repeats: int = 3) -> dict:
    from sklearn.cluster import KMeans

    from nncompress.quant import kmeans_1d

    model, _ = load_checkpoint(ckpt)
    w = model.get_submodule(layer).weight.detach().flatten()
    w = w[w != 0]
    x = w.double().numpy()
    k = 2**bits
    t_ours, t_sk = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cb, labels = kmeans_1d(w, k, init="linear", max_iter=300)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        km = KMeans(
            k, init=np.linspace(x.min(), x.max(), k)[:, None], n_init=1, max_iter=300, tol=0.0
        ).fit(x[:, None])
        t_sk.append(time.perf_counter() - t0)
    ours_inertia = float(np.sum((x - cb.double().numpy()[labels.numpy()]) ** 2))
    return {
        "layer": layer,
        "n": int(w.numel()),
        "k": k,
        "ours_s": statistics.median(t_ours),
        "sklearn_s": statistics.median(t_sk),
        "speedup": statistics.median(t_sk) / statistics.median(t_ours),
        "ours_inertia": ours_inertia,
        "sklearn_inertia": float(km.inertia_),
        "inertia_ratio": ours_inertia / float(km.inertia_),
    }


# ------------------------------------------------------------------ main


def _paper_table(model: str) -> str:
    lines = [
        "| layer | kept % | weight bits P+Q | weight bits H | index bits P+Q | index bits H | "
        "rate P+Q | rate P+Q+H |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in PAPER[model].items():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    parser.add_argument("--variants", nargs="+", default=None, help="subset of variant names")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results: dict = {"models": {}, "kmeans": [], "notes": []}
    md: list[str] = [
        "# Deep Compression on Fashion-MNIST (prune -> share -> Huffman/ANS)",
        "",
        "Every compressed accuracy is that of the decoded `.ncz` file on the 10k test split; "
        "every size is the file's bytes on disk vs the dense fp32 parameters. Wall times were "
        "measured on 2 CPU cores shared with other jobs (noisy).",
    ]
    for model in args.models:
        variants = VARIANTS[model]
        names = args.variants or list(variants)
        model_res = {}
        md += ["", f"## {model}", "", f"Paper (MNIST): {PAPER_SUMMARY[model]}", ""]
        md += [
            "| variant | baseline acc. % | final acc. % (decoded) | drop (points) | "
            "file bytes | ratio | meets target |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        target = 40.0 if model == "lenet-300-100" else 39.0
        for vname in names:
            if vname not in variants:
                continue
            recipe = load_recipe(recipe_for(model, variants[vname]))
            out = OUT / f"{model}-{vname.replace('%', 'pct').replace('+', '_')}"
            t0 = time.perf_counter()
            report = run_recipe(recipe, out, resume=True)
            report["bench_wall_s"] = time.perf_counter() - t0
            model_res[vname] = report
            ok = report["compression_ratio"] >= target and report["accuracy_drop"] <= 0.5
            md.append(
                f"| {vname} | {report['baseline_accuracy']:.2f} | "
                f"{report['final_accuracy']:.2f} | {report['accuracy_drop']:.2f} | "
                f"{report['compressed_bytes']:,} | {report['compression_ratio']:.1f}x | "
                f"{'yes' if ok else 'no'} (>= {target:.0f}x, <= 0.5) |"
            )
            print(vname, md[-1], flush=True)
        results["models"][model] = model_res
        # per-layer tables: ours (each variant) beside the paper's
        md += ["", f"### {model}: paper, Table {2 if model == 'lenet-300-100' else 3} (MNIST)"]
        md += ["", _paper_table(model)]
        for vname, report in model_res.items():
            md += ["", f"### {model}, ours: {vname}", "", layer_table_markdown(report["layers"])]
        # stages and their wall time
        md += ["", f"### {model}: stages (test accuracy after each, wall time)", ""]
        md += ["| variant | stage | acc. % | nonzeros | size bytes | wall s |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for vname, report in model_res.items():
            for s in report["stages"]:
                est = "" if s["size_kind"] == "file" else " (est.)"
                md.append(
                    f"| {vname} | {s['name']} | {s['accuracy']:.2f} | {s['nonzeros']:,} | "
                    f"{s['size_bytes']:,}{est} | {s['wall_time_s']:.1f} |"
                )
        # other storage formats for the same weights (the first variant's shared model)
        if model_res:
            vname = next(iter(model_res))
            report = model_res[vname]
            out = OUT / f"{model}-{vname.replace('%', 'pct').replace('+', '_')}"
            ckpt = out / next(s for s in report["stages"] if s["name"] == "encode")["checkpoint"]
            sizes = {"ours: .ncz (Huffman)": report["compressed_bytes"], **other_formats(ckpt)}
            dense = report["original_bytes"]
            results["models"][model]["storage"] = {"variant": vname, "bytes": sizes}
            md += ["", f"### {model}: the same pruned + shared weights ({vname}) stored other ways"]
            md += ["", "| storage | bytes | ratio vs dense fp32 |", "|---|---:|---:|"]
            for k, v in sizes.items():
                md.append(f"| {k} | {v:,} | {dense / v:.1f}x |")
            # decoded accuracy sanity: the encode-stage checkpoint is what the file decodes to
            m, _ = load_checkpoint(ckpt)
            from nncompress.data import fashion_mnist

            acc = evaluate(m, fashion_mnist().loader("test", 512))["accuracy"]
            if abs(acc - report["final_accuracy"]) > 1e-9:
                results["notes"].append(f"{model}: encode checkpoint acc {acc} != decoded")
            # k-means vs scikit-learn on this model's pruned layers
            prune_ckpt = (
                out / next(s for s in report["stages"] if s["name"] == "prune")["checkpoint"]
            )
            layers = ["fc1", "fc2"] if model == "lenet-300-100" else ["conv2", "fc1"]
            bits = {"fc1": 5, "fc2": 5, "conv2": 8}
            for layer in layers:
                results["kmeans"].append(
                    {"model": model, **kmeans_vs_sklearn(prune_ckpt, layer, bits[layer])}
                )
    if results["kmeans"]:
        md += [
            "",
            "## 1-D k-means: ours vs scikit-learn KMeans",
            "",
            "Same data (the surviving weights of a pruned layer), same linear init, n_init=1, "
            "max_iter=300, tol=0; median of 3 runs; scikit-learn with its default threads, ours "
            "single-threaded numpy.",
            "",
            "| model | layer | survivors | k | ours (s) | sklearn (s) | speed-up | inertia ours / sklearn |",  # noqa: E501
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["kmeans"]:
            md.append(
                f"| {r['model']} | {r['layer']} | {r['n']:,} | {r['k']} | {r['ours_s']:.4f} | "
                f"{r['sklearn_s']:.3f} | {r['speedup']:.0f}x | {r['inertia_ratio']:.4f} |"
            )
    for note in results["notes"]:
        md += ["", f"Note: {note}"]
    write_result("deep_compression", copy.deepcopy(results), "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
