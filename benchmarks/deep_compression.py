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
import gzip
import io
import json
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

# Variants: changes applied to the shipped recipe's stages (the recipe without its `train`
# stage, starting from the baseline checkpoint). "paper" pins the paper's settings explicitly.
FP16 = {"codebook_dtype": "fp16", "dense_dtype": "fp16"}
VARIANTS: dict[str, dict[str, dict]] = {
    "lenet-300-100": {
        "recipe": {},  # the shipped recipe as is
        # the paper's settings: retraining at 1/10 of the rate, no distillation, 6 bits, b=5
        "paper": {
            "prune": {"iterations": 3, "epochs": 4, "lr_scale": 0.1, "distill": None},
            "share": {"bits_fc": 6, "per_layer": {}},
            "finetune": {"epochs": 3, "lr_scale": 0.1},
            "encode": {
                "codec": "huffman",
                "auto_index_bits": False,
                "index_bits_fc": 5,
                "codebook_dtype": "fp32",
                "dense_dtype": "fp32",
            },
        },
        "recipe without distillation": {"prune": {"distill": None}},
        # the recipe's pruned weights at 5 bits (the recipe: 4 bits, 5-bit fc3), ANS
        "recipe's pruning, 5 bits+ans": {
            "_from": "recipe",
            "share": {"bits_fc": 5, "per_layer": {}},
            "encode": {"codec": "ans"},
        },
        # further: 94% pruned overall, per-layer sparsities from the sensitivity analysis
        "sensitivity-94%+4bit+ans": {
            "prune": {"sparsity": 0.94, "per_layer": {}, "allocate": "sensitivity"},
            "share": {"bits_fc": 4, "per_layer": {}},
            "finetune": {"epochs": 2},
            "encode": {"codec": "ans"},
        },
    },
    "lenet-5": {
        "recipe": {},  # the shipped recipe as is
        # the recipe's pruned weights with the paper's bit widths and storage settings
        "recipe's pruning, paper's bits": {
            "_from": "recipe",
            "share": {"bits_conv": 8, "bits_fc": 5},
            "encode": {
                "auto_index_bits": False,
                "index_bits_conv": 8,
                "index_bits_fc": 5,
                "codebook_dtype": "fp32",
                "dense_dtype": "fp32",
            },
        },
        "recipe+4-bit FC": {"_from": "recipe", "share": {"bits_fc": 4}},
        # what retraining buys: the same sparsities in one shot
        "one-shot, no retraining": {
            "prune": {"iterations": 1, "epochs": 0},
            "finetune": {"epochs": 0},
        },
        "one-shot + 1 retraining epoch": {
            "prune": {"iterations": 1, "epochs": 1},
            "finetune": {"epochs": 0},
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
    source = changes.get("_from")
    if source:
        # start from another variant's pruned checkpoint: no pruning, no retraining
        vdir = _out_dir(model, source)
        state = json.loads((vdir / "state.json").read_text())
        prune = next(e for e in state["finished"] if e["name"] == "prune")
        data["baseline"] = str(vdir / prune["checkpoint"])
        data["stages"] = [s for s in stages if s["stage"] != "prune"]
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


# ------------------------------------------------------------------ re-encodings


REENCODINGS = {
    "huffman, fp32 codebooks/biases, b=5": {},
    "huffman, fp16": FP16,
    "huffman, fp16, b_fc=7": {**FP16, "index_bits_fc": 7},
    "ans, fp16, b_fc=7": {**FP16, "index_bits_fc": 7, "codec": "ans"},
}


def reencode(ckpt: Path, ncz: Path, splits) -> list[dict]:
    """Encode the same pruned + shared weights with other storage options; decode each file
    and evaluate the decoded model (fp16 rounding can change the accuracy)."""
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
        data, rep = encode_state_dict(model, cfg, metadata)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, _ = decode_bytes(data)
        t_dec = time.perf_counter() - t0
        model.load_state_dict(state)
        acc = evaluate(model, splits.loader("test", 512))["accuracy"]
        rows.append(
            {
                "encoding": label,
                "bytes": len(data),
                "accuracy": acc,
                "encode_s": t_enc,
                "decode_s": t_dec,
                "index_bits_h": {
                    t.name: t.index_bits_per_nz
                    for t in rep.tensors
                    if t.fillers or t.layout == "sparse"
                },
            }
        )
    return rows


# ------------------------------------------------------------------ k-means vs scikit-learn


def kmeans_vs_sklearn(ckpt: Path, layer: str, bits: int, repeats: int = 1) -> dict:
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


def _out_dir(model: str, vname: str) -> Path:
    safe = vname.replace("%", "pct").replace("+", "_").replace(", ", "_").replace(" ", "-")
    return OUT / f"{model}-{safe}"


def bench_model(model: str, names: list[str] | None) -> tuple[dict, list[str]]:
    """Run the variants of one model; returns its JSON results and markdown lines."""
    from nncompress.data import fashion_mnist

    variants = VARIANTS[model]
    names = [n for n in (names or list(variants)) if n in variants]
    target = 40.0 if model == "lenet-300-100" else 39.0
    res: dict = {"variants": {}, "kmeans": []}
    md = ["", f"## {model}", "", f"Paper (MNIST): {PAPER_SUMMARY[model]}", ""]
    md += [
        "| variant | baseline acc. % | final acc. % (decoded file) | drop (points) | "
        "file bytes | ratio | target met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for vname in names:
        recipe = load_recipe(recipe_for(model, variants[vname]))
        t0 = time.perf_counter()
        report = run_recipe(recipe, _out_dir(model, vname), resume=True)
        report["bench_wall_s"] = time.perf_counter() - t0
        source = variants[vname].get("_from")
        if source:  # accuracy loss against the real baseline, prune stage of the source
            src = res["variants"][source]
            report["pruned_checkpoint_accuracy"] = report["baseline_accuracy"]
            report["baseline_accuracy"] = src["baseline_accuracy"]
            report["accuracy_drop"] = src["baseline_accuracy"] - report["final_accuracy"]
            report["original_bytes"] = src["original_bytes"]
            report["compression_ratio"] = src["original_bytes"] / report["compressed_bytes"]
            report["stages"] = [
                next(st for st in src["stages"] if st["name"] == "prune"),
                *report["stages"],
            ]
        report["recipe_used"] = recipe.to_dict()
        res["variants"][vname] = report
        ok = report["compression_ratio"] >= target and report["accuracy_drop"] <= 0.5
        md.append(
            f"| {vname} | {report['baseline_accuracy']:.2f} | {report['final_accuracy']:.2f} | "
            f"{report['accuracy_drop']:.2f} | {report['compressed_bytes']:,} | "
            f"{report['compression_ratio']:.1f}x | {'yes' if ok else 'no'} "
            f"(>= {target:.0f}x and <= 0.5 points) |"
        )
        print(model, md[-1], flush=True)
    reports = res["variants"]
    md += ["", f"### {model}: paper, Table {2 if model == 'lenet-300-100' else 3} (MNIST)"]
    md += ["", _paper_table(model)]
    for vname, report in reports.items():
        md += ["", f"### {model}, ours: {vname}", "", layer_table_markdown(report["layers"])]
    md += ["", f"### {model}: stages (test accuracy after each stage, wall time)", ""]
    md += ["| variant | stage | acc. % | nonzeros | size bytes | wall s |",
           "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for vname, report in reports.items():
        for st in report["stages"]:
            est = "" if st["size_kind"] == "file" else " (est.)"
            md.append(
                f"| {vname} | {st['name']} | {st['accuracy']:.2f} | {st['nonzeros']:,} | "
                f"{st['size_bytes']:,}{est} | {st['wall_time_s']:.1f} |"
            )
    if not reports:
        return res, md
    splits = fashion_mnist()

    def ckpt_of(vname: str, stage: str) -> Path:
        entry = next(st for st in reports[vname]["stages"] if st["name"] == stage)
        return _out_dir(model, vname) / entry["checkpoint"]

    # the same pruned + shared weights stored other ways (the first variant of the table)
    vname = next(iter(reports))
    report = reports[vname]
    ckpt = ckpt_of(vname, "encode")
    m, _ = load_checkpoint(ckpt)
    acc = evaluate(m, splits.loader("test", 512))["accuracy"]
    res["encode_checkpoint_matches_decoded"] = acc == report["final_accuracy"]
    sizes = {f"ours: .ncz ({vname} settings)": report["compressed_bytes"], **other_formats(ckpt)}
    res["storage"] = {"variant": vname, "bytes": sizes}
    dense = report["original_bytes"]
    md += ["", f"### {model}: the same pruned + shared weights ({vname}) stored other ways", ""]
    md += ["| storage | bytes | ratio vs dense fp32 |", "|---|---:|---:|"]
    for k, v in sizes.items():
        md.append(f"| {k} | {v:,} | {dense / v:.1f}x |")
    # each variant's weights re-encoded with other storage options, decoded and evaluated
    md += ["", f"### {model}: storage options for the same weights (decoded and evaluated)", ""]
    md += ["| variant | encoding | bytes | ratio | acc. % (decoded) | drop |",
           "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for vname, report in reports.items():
        rows = reencode(ckpt_of(vname, "encode"), _out_dir(model, vname) / "model.ncz", splits)
        report["reencodings"] = rows
        for r in rows:
            md.append(
                f"| {vname} | {r['encoding']} | {r['bytes']:,} | "
                f"{report['original_bytes'] / r['bytes']:.1f}x | {r['accuracy']:.2f} | "
                f"{report['baseline_accuracy'] - r['accuracy']:.2f} |"
            )
    # k-means vs scikit-learn on this model's pruned layers
    prune_ckpt = ckpt_of(next(iter(reports)), "prune")
    for layer, bits in (
        (("fc1", 5), ("fc2", 5))
        if model == "lenet-300-100"
        else (
            ("conv2", 8),
            ("fc1", 5),
        )
    ):
        res["kmeans"].append({"model": model, **kmeans_vs_sklearn(prune_ckpt, layer, bits)})
    return res, md


def assemble() -> None:
    """Merge the per-model fragments under out/deep_compression into results/deep_compression."""
    import json

    results: dict = {"models": {}, "kmeans": []}
    md: list[str] = [
        "# Deep Compression on Fashion-MNIST (prune -> share -> Huffman / ANS)",
        "",
        "Every compressed accuracy is that of the decoded `.ncz` file on the 10k test split; every "
        "size is the file's bytes on disk against the dense fp32 parameters. Each variant runs "
        "the real pipeline (`run_recipe`) from the baseline checkpoint. Wall times were measured "
        "on 2 CPU cores, one torch thread, with another benchmark running on the other core.",
    ]
    for model in VARIANTS:
        frag = OUT / f"{model}.json"
        if not frag.is_file():
            continue
        data = json.loads(frag.read_text())
        results["models"][model] = data["results"]
        results["kmeans"] += data["results"].get("kmeans", [])
        md += data["markdown"]
    if results["kmeans"]:
        md += [
            "",
            "## 1-D k-means: ours vs scikit-learn KMeans",
            "",
            "Same data (the surviving weights of a pruned layer of the first variant), same linear "
            "init, n_init=1, max_iter=300, tol=0; one timed run each (another benchmark on the "
            "other core). scikit-learn (Lloyd, its default threads) vs ours (sort once + "
            "searchsorted on midpoints, numpy).",
            "",
            "| model | layer | survivors | k | ours (s) | sklearn (s) | speed-up | "
            "inertia ours / sklearn |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["kmeans"]:
            md.append(
                f"| {r['model']} | {r['layer']} | {r['n']:,} | {r['k']} | {r['ours_s']:.4f} | "
                f"{r['sklearn_s']:.3f} | {r['speedup']:.0f}x | {r['inertia_ratio']:.4f} |"
            )
    write_result("deep_compression", results, "\n".join(md))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--variants", nargs="+", default=None, help="subset of variant names")
    parser.add_argument(
        "--assemble-only", action="store_true", help="only merge finished per-model results"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    from nncompress.engine import atomic_write

    if not args.assemble_only:
        for model in args.models:
            res, md = bench_model(model, args.variants)
            blob = json.dumps({"results": res, "markdown": md}, indent=1, default=str)
            atomic_write(OUT / f"{model}.json", lambda p, b=blob: p.write_text(b))
    assemble()


if __name__ == "__main__":
    main()
