"""Our coders against NNCodec (the MPEG-7 NNR reference codec, DeepCABAC) and general-purpose
compressors on the same pruned + shared LeNet-300-100 weights (issue 18).

Per seed, the shipped Deep Compression recipe (recipes/deep-compression-lenet-300-100.yaml
without its `train` stage, from the baseline checkpoint, the recipe's training seed set to
the seed) gives pruned + 4/5-bit shared weights with fp16 codebooks and biases. Those exact
weights are then stored:

* ours, lossless: Huffman (Deep Compression stage 3, the recipe's encoder), ANS, and the
  context coder (codec 'context', coding/context.py);
* ours, re-quantized: ECSQ (quant/ecsq.py, Fisher importance from held-out batches) with and
  without rate-distortion pruning, over a lambda grid, context-coded;
* NNCodec 2.1.3 in its own environment (``make nncodec-venv``): a sweep of qp, dependent
  quantization (trellis), lambda_scale and codebook modes;
* xz -9e and zstd -19 of the uint8 cluster indices + fp16 codebooks and biases.

Every file is decoded and evaluated. "Equal accuracy" = held-out (val) accuracy within 0.05
points of the input weights'; for each method the smallest such file is chosen on val, then
evaluated once on test. Reported: mean +- std over the seeds of those bytes and test
accuracies, and a plot of bytes vs val accuracy for every sweep point.

Run from benchmarks/:  ../.venv/bin/python coding_vs_nncodec.py [--smoke] [--seeds 0 1 2]
(--smoke: 8x8 digits, a tiny recipe, two NNCodec settings; seconds).
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import PATHS, ROOT, add_results_dir_arg, baseline, out_dir, setup, write_result

OUT = ROOT / "out" / "coding_vs_nncodec"
NNC_PY = ROOT / ".venv-nncodec" / "bin" / "python"
TOL = 0.05  # points of held-out accuracy that count as "equal accuracy"
LAMBDAS = [0.0, 1e-9, 3e-9, 1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6]


def nncodec_configs(smoke: bool) -> list[dict]:
    if smoke:
        return [{"qp": -24, "use_dq": False}, {"qp": -30, "use_dq": True}]
    cfgs = []
    for qp in range(-16, -36, -2):
        for dq in (False, True):
            for lam in (0.0, 1.0):
                cfgs.append({"qp": qp, "use_dq": dq, "lambda_scale": lam, "nonweight_qp": -40})
    for qp in range(-24, -42, -2):
        cfgs.append({"qp": qp, "codebook_mode": 1, "use_dq": False, "nonweight_qp": -40})
        cfgs.append({"qp": qp, "codebook_mode": 2, "use_dq": False, "nonweight_qp": -40})
    return cfgs


# ------------------------------------------------------------------ the weights


def _recipe(seed: int, smoke: bool) -> dict:
    import yaml

    if smoke:
        return {
            "name": "smoke",
            "model": "lenet-300-100",
            "data": "digits",
            "train": {"epochs": 3, "lr": 0.05, "seed": seed},
            "stages": [
                {"stage": "train"},
                {"stage": "prune", "method": "magnitude", "sparsity": 0.9, "iterations": 1,
                 "epochs": 1},
                {"stage": "share", "bits_fc": 4},
                {"stage": "encode", "codebook_dtype": "fp16", "dense_dtype": "fp16"},
            ],
        }  # fmt: skip
    data = yaml.safe_load((ROOT.parent / "recipes/deep-compression-lenet-300-100.yaml").read_text())
    data.pop("model")
    data.pop("data")
    data["baseline"] = str(baseline("lenet-300-100"))
    data["train"]["seed"] = seed
    data["stages"] = [s for s in data["stages"] if s["stage"] != "train"]
    return data


def pruned_shared(seed: int, smoke: bool):
    """(model, splits, report): the recipe's final (encoded, fp16-rounded) model."""
    from nncompress.data import digits, fashion_mnist
    from nncompress.engine import load_checkpoint
    from nncompress.recipe import load_recipe, run_recipe

    out = OUT / ("smoke" if smoke else "lenet-300-100") / f"seed{seed}"
    report = run_recipe(load_recipe(_recipe(seed, smoke)), out, resume=True)
    entry = next(st for st in report["stages"] if st["name"] == "encode")
    model, _ = load_checkpoint(out / entry["checkpoint"])
    return model.eval(), (digits() if smoke else fashion_mnist()), report


def _accuracy(model, state: dict[str, torch.Tensor], loader) -> float:
    from nncompress.engine import evaluate

    model.load_state_dict({k: torch.as_tensor(v).to(model.state_dict()[k].dtype)
                           for k, v in state.items()})  # fmt: skip
    return evaluate(model, loader)["accuracy"]


# ------------------------------------------------------------------ the methods


def ours(model, splits, seed: int) -> list[dict]:
    """Our encoder on the weights as they are (lossless) and after ECSQ re-quantization."""
    from nncompress.io import EncodeConfig, decode_bytes, encode_state_dict, round_for_storage_
    from nncompress.quant.ecsq import ECSQConfig, ecsq_share_, fisher_importance

    fp16 = {"codebook_dtype": "fp16", "dense_dtype": "fp16", "auto_index_bits": True}
    rows = []
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for codec in ("huffman", "ans", "context"):
        t0 = time.perf_counter()
        data, _ = encode_state_dict(sd, EncodeConfig(codec=codec, **fp16))
        t1 = time.perf_counter()
        state, _ = decode_bytes(data)
        t2 = time.perf_counter()
        rows.append({"method": f"ours: {codec}", "setting": "lossless", "bytes": len(data),
                     "state": state, "encode_s": t1 - t0, "decode_s": t2 - t1})  # fmt: skip
    # ECSQ re-quantization of the shared weights (Fisher importance on held-out batches)
    fisher = fisher_importance(_fold(model), splits.loader("val", 256), batches=8)
    for prune in (False, True):
        for lam in LAMBDAS:
            plain = _fold(model)
            ecsq_share_(plain, ECSQConfig(bits_fc=5, lam=lam, prune=prune), importance=fisher)
            plain = _fold(plain)
            round_for_storage_(plain, EncodeConfig(codec="context", **fp16))
            data, _ = encode_state_dict(plain, EncodeConfig(codec="context", **fp16))
            state, _ = decode_bytes(data)
            method = "ours: ecsq+rd-prune+context" if prune else "ours: ecsq+context"
            rows.append({"method": method, "setting": f"lambda={lam:g}", "bytes": len(data),
                         "state": state})  # fmt: skip
    return rows


def _fold(model):
    from nncompress.core.modules import folded_copy

    return folded_copy(model).eval()


def nncodec(model, workdir: Path, smoke: bool) -> list[dict]:
    """NNCodec's sweep, run in its own environment; [] (with a note) when it is missing."""
    if not NNC_PY.is_file():
        print(f"NNCodec environment missing ({NNC_PY}): run 'make nncodec-venv'", flush=True)
        return []
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    np.savez(workdir / "weights.npz", **sd)
    cfgs = nncodec_configs(smoke)
    (workdir / "configs.json").write_text(json.dumps(cfgs))
    res = workdir / "nnc"
    if not (res / "results.jsonl").is_file() or len(
        (res / "results.jsonl").read_text().splitlines()
    ) < len(cfgs):
        if res.exists():
            for f in res.iterdir():
                f.unlink()
        subprocess.run(
            [str(NNC_PY), str(ROOT / "nncodec_worker.py"), str(workdir / "weights.npz"),
             str(workdir / "configs.json"), str(res)],
            check=True,
        )  # fmt: skip
    rows = []
    for line in (res / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        with np.load(res / f"{r['index']}.npz") as f:
            state = {k: torch.from_numpy(f[k].copy()) for k in f.files}
        cfg = r["config"]
        mode = {0: "uniform", 1: "codebook", 2: "codebook-2"}[cfg.get("codebook_mode", 0)]
        setting = f"{mode} qp={cfg['qp']} dq={int(cfg.get('use_dq', True))} " + (
            f"lambda={cfg.get('lambda_scale', 0)}"
        )
        rows.append({"method": "NNCodec 2.1.3", "setting": setting, "bytes": r["bytes"],
                     "state": state, "encode_s": r["encode_s"], "decode_s": r["decode_s"]})  # fmt: skip
    return rows


def general_purpose(model) -> list[dict]:
    """xz -9e / zstd -19 of the uint8 cluster indices (0 = pruned) + fp16 codebooks and
    biases: lossless for these (fp16-rounded) weights."""
    import zstandard

    parts = []
    for t in model.state_dict().values():
        a = t.detach().numpy()
        nz = a[a != 0]
        values = np.unique(nz)
        if a.ndim >= 2 and values.size <= 255:
            codes = np.zeros(a.shape, dtype=np.uint8)
            codes[a != 0] = (np.searchsorted(values, nz) + 1).astype(np.uint8)
            parts += [codes.tobytes(), values.astype(np.float16).tobytes()]
        else:
            parts.append(a.astype(np.float16).tobytes())
    blob = b"".join(parts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return [
        {"method": "xz -9e (uint8 indices)", "setting": "lossless", "state": state,
         "bytes": len(lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME))},
        {"method": "zstd -19 (uint8 indices)", "setting": "lossless", "state": state,
         "bytes": len(zstandard.ZstdCompressor(level=19).compress(blob))},
    ]  # fmt: skip


# ------------------------------------------------------------------ selection and report


def run_seed(seed: int, smoke: bool) -> dict:
    model, splits, report = pruned_shared(seed, smoke)
    val, test = splits.loader("val", 512), splits.loader("test", 512)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_val = _accuracy(model, ref, val)
    workdir = OUT / ("smoke" if smoke else "lenet-300-100") / f"seed{seed}"
    rows = ours(model, splits, seed) + nncodec(model, workdir, smoke) + general_purpose(model)
    for r in rows:
        r["val_accuracy"] = _accuracy(model, r["state"], val)
    best = {}
    for r in rows:
        if r["val_accuracy"] >= ref_val - TOL:
            cur = best.get(r["method"])
            if cur is None or r["bytes"] < cur["bytes"]:
                best[r["method"]] = r
    for r in best.values():
        r["test_accuracy"] = _accuracy(model, r["state"], test)  # once per reported row
    model.load_state_dict(ref)
    for r in rows:
        r.pop("state")
    return {
        "seed": seed,
        "reference_val_accuracy": ref_val,
        "reference_bytes_recipe": report["compressed_bytes"],
        "original_bytes": report["original_bytes"],
        "baseline_accuracy": report["baseline_accuracy"],
        "points": rows,
        "best": {m: {k: v for k, v in r.items()} for m, r in best.items()},
    }


def _ms(values: list[float], fmt: str = ",.0f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} +- {format(statistics.stdev(values), fmt)}"


def summarize(seeds: list[dict]) -> tuple[dict, list[str]]:
    methods = sorted({m for s in seeds for m in s["best"]})
    table = {}
    for m in methods:
        got = [s["best"][m] for s in seeds if m in s["best"]]
        table[m] = {
            "bytes": [g["bytes"] for g in got],
            "test_accuracy": [g["test_accuracy"] for g in got],
            "settings": [g["setting"] for g in got],
        }
    mean = {m: statistics.mean(v["bytes"]) for m, v in table.items()}
    ours_best = min((m for m in mean if m.startswith("ours")), key=mean.get, default=None)
    nnc = mean.get("NNCodec 2.1.3")
    xz = mean.get("xz -9e (uint8 indices)")
    targets = {}
    if ours_best and nnc:
        targets["no larger than NNCodec's smallest"] = mean[ours_best] <= nnc
    if ours_best and xz:
        targets[">= 1.3x smaller than xz -9e"] = xz / mean[ours_best] >= 1.3
    md = [
        "| method | smallest file at equal val accuracy (bytes) | test acc. % | settings chosen |",
        "|---|---:|---:|---|",
    ]
    for m in sorted(table, key=mean.get):
        v = table[m]
        md.append(f"| {m} | {_ms(v['bytes'])} | {_ms(v['test_accuracy'], '.2f')} | "
                  f"{'; '.join(v['settings'])} |")  # fmt: skip
    md += ["", f"Best of ours: {ours_best} ({mean.get(ours_best, 0):,.0f} B mean)."]
    if nnc:
        md.append(f"NNCodec smallest: {nnc:,.0f} B; ours / NNCodec = {mean[ours_best] / nnc:.3f}.")
    if xz:
        md.append(f"xz -9e: {xz:,.0f} B; xz / ours = {xz / mean[ours_best]:.3f}.")
    for k, v in targets.items():
        md.append(f"- target {k}: **{'met' if v else 'MISSED'}**")
    return {"table": table, "ours_best": ours_best, "targets": targets}, md


def plot(seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    s = seeds[0]
    for m in sorted({p["method"] for p in s["points"]}):
        pts = sorted((p["bytes"], p["val_accuracy"]) for p in s["points"] if p["method"] == m)
        ax.plot([b for b, _ in pts], [a for _, a in pts], "o-" if len(pts) > 1 else "s",
                label=m, markersize=4)  # fmt: skip
    ax.axhline(s["reference_val_accuracy"] - TOL, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("file bytes")
    ax.set_ylabel("val accuracy %")
    ax.set_title(f"LeNet-300-100, pruned + shared (seed {s['seed']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="digits, tiny recipe, 2 NNCodec runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_results_dir_arg(p)
    args = p.parse_args(argv)
    setup(args)
    global OUT
    OUT = out_dir("coding_vs_nncodec")
    if args.smoke:
        args.seeds = args.seeds[:1]
        global LAMBDAS
        LAMBDAS = [0.0, 1e-6]
    t0 = time.perf_counter()
    seeds = [run_seed(s, args.smoke) for s in args.seeds]
    summary, md = summarize(seeds)
    name = "coding_vs_nncodec" + ("_smoke" if args.smoke else "")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "plot.png"
        plot(seeds, png)
        PATHS.results.mkdir(parents=True, exist_ok=True)
        (PATHS.results / f"{name}.png").write_bytes(png.read_bytes())
    head = [
        f"Seeds {args.seeds}; equal accuracy = val accuracy >= the input weights' - {TOL} "
        "points; test evaluated once per reported row. Input: the shipped Deep Compression "
        "recipe's pruned + shared LeNet-300-100 (fp16 codebooks and biases), per seed.",
        "",
    ]
    write_result(name, {"seeds": seeds, "summary": summary,
                        "wall_s": time.perf_counter() - t0}, "\n".join(head + md),
                 None if argv is None else ["coding_vs_nncodec.py", *argv])  # fmt: skip
    print("\n".join(head + md))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
