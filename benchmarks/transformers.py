"""Transformers at 8x / 10x / 12x smaller files (issue 17): a ViT-tiny on Fashion-MNIST and a
character-level GPT on Debian's plain text (licences + man pages), both trained here.

For each trained model (one per seed) and each target ratio R (file = dense fp32 size / R):

* ``rtn`` / ``gptq``: uniform bits and group size, the largest configuration of the grid
  bits {2..6, 8} x group {32, 64, 128, per-channel} whose fixed-width file fits the budget
  (chosen by size alone), quantized by round-to-nearest or by GPTQ on calibration batches;
* ``kmeans``: activation-weighted k-means per weight, the most bits that fit;
* ``mixed``: per-layer bits chosen automatically (sensitivity scan + knapsack, GPTQ, group 64)
  for exactly the budget.

Everything else (LayerNorms, biases, position / class tokens) is stored in float16; files are
Huffman-coded ``.ncz`` and the reported size is the real file. No fine-tuning: post-training
compression only, so no dense control run is needed. Calibration batches come from the
training split; nothing is chosen by test results (the grid choice is by bytes; the mixed
allocation by the calibration scan). Test accuracy / perplexity is measured once per row.

Also: INT8 dynamic quantization in onnxruntime of the ViT (latency vs fp32 ORT and eager) and
the wall time of compressing a ~20M-parameter GPT (random weights: the time does not depend on
them) at 8x with the mixed allocation.

Usage: ``python benchmarks/transformers.py [--smoke] [--seeds 0,1,2] [--parts vit,gpt,time]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PATHS, add_results_dir_arg, setup, write_result  # noqa: E402
from nncompress.data import fashion_mnist  # noqa: E402
from nncompress.data.corpus import debian_text, lm_batches  # noqa: E402
from nncompress.engine import TrainConfig, evaluate, fit, seed_everything  # noqa: E402
from nncompress.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nncompress.io import EncodeConfig, encode_state_dict  # noqa: E402
from nncompress.lowrank.whiten import WhitenedSVDConfig, decompose_whitened_  # noqa: E402
from nncompress.models import create  # noqa: E402
from nncompress.quant.awkmeans import AwareKMeansConfig, share_weights_aware_  # noqa: E402
from nncompress.quant.mixed import MixedPrecisionConfig, quantize_mixed_  # noqa: E402
from nncompress.quant.weight_only import WeightOnlyConfig, quantize_weights_  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "transformers"
RATIOS = (8, 10, 12)
GRID_BITS = (2, 3, 4, 5, 6, 8)
GRID_GROUPS = (32, 64, 128, None)
KMEANS_BITS = tuple(range(1, 9))


def wcfg(**kw) -> WeightOnlyConfig:
    """Weight-only settings: a group size that does not divide a layer (the ViT's 49-pixel
    patch embedding) means per channel for that layer."""
    return WeightOnlyConfig(per_channel_fallback=True, **kw)


def dense_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def file_bytes(model, codec: str = "huffman") -> int:
    data, _ = encode_state_dict(model, EncodeConfig(dense_dtype="fp16", codec=codec))
    return len(data)


# ------------------------------------------------------------------------------ models

# training time of the models this run loaded from out/transformers instead of training them: a
# fresh `make bench` trains them, so the section's compute counts it (compute_s)
CACHED_TRAIN_S: list[float] = []


def vit_model(seed: int, epochs: int, smoke: bool, log):
    path = OUT / f"vit-tiny-seed{seed}{'-smoke' if smoke else ''}.safetensors"
    splits = fashion_mnist()
    if path.is_file():
        model, side = load_checkpoint(path)
        CACHED_TRAIN_S.append(side["metrics"]["train_seconds"])
        return model.eval(), splits, side["metrics"]
    seed_everything(seed)
    model = create("vit-tiny")
    cfg = TrainConfig(
        epochs=epochs,
        lr=2e-3,
        optimizer="adamw",
        weight_decay=0.05,
        warmup_epochs=0.5,
        batch_size=128,
        restore_best=True,
        seed=seed,
    )
    train = splits.loader("train", 128, seed=seed, augment=True)
    if smoke:
        train = list(train)[:4]
    val = splits.loader("val", 500)
    t0 = time.perf_counter()
    hist = fit(model, train, cfg, val_loader=list(val)[:2] if smoke else val)
    metrics = {
        "train_seconds": time.perf_counter() - t0,
        "val_accuracy": evaluate(model, val)["accuracy"],
        "best_epoch": hist.best_epoch,
    }
    log(f"vit seed {seed}: trained {metrics}")
    save_checkpoint(model, path, model_name="vit-tiny", metrics=metrics)
    return model.eval(), splits, metrics


def lm_loss(out, y, x):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def gpt_pairs(batches):
    return [(b["input_ids"][:, :-1], b["input_ids"][:, 1:]) for b in batches]


def gpt_model(seed: int, steps: int, corpus, smoke: bool, log):
    path = OUT / f"char-gpt-seed{seed}{'-smoke' if smoke else ''}.safetensors"
    kwargs = {"vocab_size": corpus.vocab_size}
    if path.is_file():
        model, side = load_checkpoint(path)
        CACHED_TRAIN_S.append(side["metrics"]["train_seconds"])
        return model.eval(), side["metrics"]
    seed_everything(seed)
    model = create("char-gpt", **kwargs)
    train = gpt_pairs(lm_batches(corpus.train, 128, 32, n_batches=steps, seed=seed))
    cfg = TrainConfig(
        epochs=1,
        lr=3e-3,
        optimizer="adamw",
        weight_decay=0.01,
        warmup_epochs=0.05,
        batch_size=32,
        grad_clip=1.0,
        seed=seed,
    )
    t0 = time.perf_counter()
    fit(model, train, cfg, loss_fn=lm_loss)
    metrics = {
        "train_seconds": time.perf_counter() - t0,
        "val_perplexity": perplexity(model, corpus.val, 4 if smoke else None),
        "steps": steps,
    }
    log(f"gpt seed {seed}: trained {metrics}")
    save_checkpoint(model, path, model_name="char-gpt", model_kwargs=kwargs, metrics=metrics)
    return model.eval(), metrics


@torch.no_grad()
def perplexity(model, ids, n_batches=None) -> float:
    model.eval()
    nll, n = 0.0, 0
    for b in lm_batches(ids, 128, 32, n_batches=n_batches):
        x, y = b["input_ids"][:, :-1], b["input_ids"][:, 1:]
        out = model(x)
        nll += float(
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
        )
        n += y.numel()
    return math.exp(nll / n)


# ------------------------------------------------------------------------------ methods


def grid_sizes(model) -> list[tuple[int, int, int | None]]:
    """``(fixed-width file bytes, bits, group)`` of every uniform grid configuration (RTN; the
    layout and so the size are the same for GPTQ)."""
    out = []
    for bits in GRID_BITS:
        for g in GRID_GROUPS:
            m = copy.deepcopy(model)
            quantize_weights_(m, wcfg(bits=bits, group_size=g, method="rtn"))
            out.append((file_bytes(m, codec="raw"), bits, g))
    return out


def uniform(model, calib, budget, method, sizes):
    """The largest grid configuration whose fixed-width file fits, quantized by ``method``."""
    fits = [c for c in sizes if c[0] <= budget]
    if not fits:
        return None, {}
    _, bits, g = max(fits, key=lambda c: c[0])
    m = copy.deepcopy(model)
    cfg = wcfg(bits=bits, group_size=g, method=method, calibration_batches=None)
    quantize_weights_(m, cfg, calib if method == "gptq" else None)
    return m, {"bits": bits, "group_size": g}


def kmeans_models(model, calib) -> list[tuple[int, int, object]]:
    """``(fixed-width bytes, bits, model)`` of activation-weighted k-means at 1..8 bits."""
    out = []
    for bits in KMEANS_BITS:
        m = copy.deepcopy(model)
        share_weights_aware_(m, AwareKMeansConfig(bits=bits, calibration_batches=None), calib)
        out.append((file_bytes(m, codec="raw"), bits, m))
    return out


MIXED = MixedPrecisionConfig(
    bit_choices=(2, 3, 4, 5, 6, 8, 16),
    quant=wcfg(group_size=64, calibration_batches=None),
    sensitivity_batches=4,
)


def mixed(model, calib, budget, cache):
    m = copy.deepcopy(model)
    plan, _ = quantize_mixed_(
        m, calib, MIXED, target_bytes=budget, measure=file_bytes, distortion=cache.get("d")
    )
    cache["d"] = plan.distortion  # the scan of the float model, reused for the other budgets
    hist = {}
    for b in plan.bits.values():
        hist[b] = hist.get(b, 0) + 1
    return m, {"bits_histogram": {str(k): v for k, v in sorted(hist.items())}}


_SIZES: dict[int, list] = {}


def run_methods(model, calib, score, log, ratios, rtn=True):
    """Every method at every ratio; RTN (no calibration: the same for every seed) only when
    ``rtn``. The grid sizes are computed once per model."""
    base = dense_bytes(model)
    t0 = time.perf_counter()
    if id(model) not in _SIZES:
        _SIZES[id(model)] = grid_sizes(model)
    sizes = _SIZES[id(model)]
    kms = kmeans_models(model, calib)
    log(f"  grid and k-means sizes in {time.perf_counter() - t0:.0f} s")
    cache: dict = {}
    rows = []
    for ratio in ratios:
        budget = int(base / ratio)
        for name in ("rtn", "gptq", "kmeans", "mixed") if rtn else ("gptq", "kmeans", "mixed"):
            t0 = time.perf_counter()
            if name in ("rtn", "gptq"):
                m, info = uniform(model, calib, budget, name, sizes)
            elif name == "kmeans":
                fit = [k for k in kms if k[0] <= budget]
                m, info = (fit[-1][2], {"bits": fit[-1][1]}) if fit else (None, {})
            else:
                m, info = mixed(model, calib, budget, cache)
            if m is None:
                log(f"  {ratio}x {name}: no configuration fits")
                continue
            size = file_bytes(m)
            row = {
                "ratio_target": ratio,
                "method": name,
                "bytes": size,
                "budget": budget,
                "ratio": base / size,
                "seconds": time.perf_counter() - t0,
                **info,
                **score(m),
            }
            rows.append(row)
            log(f"  {row}")
    return rows


# ------------------------------------------------------------------------------ parts


def part_vit(seeds, args, log):
    out = []
    model, splits, train_metrics = vit_model(args.model_seed, args.vit_epochs, args.smoke, log)
    for seed in seeds:  # compression seeds: the calibration draw
        n_calib = 2 if args.smoke else 8  # smoke: the mixed-precision scan dominated its time
        calib = [
            x for x, _ in list(splits.loader("train", 64, seed=100 + seed, shuffle=True))[:n_calib]
        ]
        n_test = 2 if args.smoke else None

        def score(m, splits=splits, n_test=n_test):
            val = evaluate(m, splits.loader("val", 500), max_batches=n_test)["accuracy"]
            test = evaluate(m, splits.loader("test", 500), max_batches=n_test)["accuracy"]
            return {"val_accuracy": val, "test_accuracy": test}

        dense = score(model)
        log(f"vit calibration seed {seed} dense: {dense}")
        rows = run_methods(model, calib, score, log, ratios_for(seed, args), rtn=seed == seeds[0])
        for r in rows:
            r["test_drop"] = dense["test_accuracy"] - r["test_accuracy"]
        out.append({"seed": seed, "train": train_metrics, "dense": dense, "rows": rows})
        if not args.smoke and seed == seeds[0]:
            out[-1]["onnx"] = onnx_int8(model, splits)
    return out


def ratios_for(seed: int, args) -> tuple[int, ...]:
    """All ratios for the first calibration seed, the 8x target for the others (time)."""
    if args.smoke:
        return RATIOS[:1]
    return RATIOS if seed == int(args.seeds.split(",")[0]) else RATIOS[:1]


def onnx_int8(model, splits):
    import tempfile

    from nncompress.quant.onnx_dynamic import (
        compare_onnx,
        export_transformer_onnx,
        quantize_onnx_dynamic,
    )

    x = next(iter(splits.loader("test", 64)))[0]
    with tempfile.TemporaryDirectory() as d:
        export_transformer_onnx(model, {"x": x}, Path(d) / "f.onnx")
        quantize_onnx_dynamic(Path(d) / "f.onnx", Path(d) / "q.onnx")
        return compare_onnx(model, Path(d) / "f.onnx", Path(d) / "q.onnx", {"x": x}, repeats=20)


def part_gpt(seeds, args, log):
    corpus = debian_text(max_man_pages=60 if args.smoke else 600)
    out = []
    model, train_metrics = gpt_model(args.model_seed, args.gpt_steps, corpus, args.smoke, log)
    for seed in seeds:  # compression seeds: the calibration draw
        calib = [
            {"input_ids": b["input_ids"][:, :-1]}
            for b in lm_batches(
                corpus.train, 128, 16, n_batches=2 if args.smoke else 8, seed=200 + seed
            )
        ]
        n_eval = 2 if args.smoke else None

        def score(m, n_eval=n_eval):
            return {  # val: the first 64 windows (informative only; nothing is chosen on it)
                "val_perplexity": perplexity(m, corpus.val, n_eval or 2),
                "test_perplexity": perplexity(m, corpus.test, n_eval),
            }

        dense = score(model)
        log(f"gpt calibration seed {seed} dense: {dense}")
        rows = run_methods(model, calib, score, log, ratios_for(seed, args), rtn=seed == seeds[0])
        for r in rows:
            r["test_increase"] = r["test_perplexity"] / dense["test_perplexity"] - 1
        out.append(
            {
                "seed": seed,
                "train": train_metrics,
                "dense": dense,
                "rows": rows,
                **corpus.describe(),
            }
        )
    return out


def part_time(args, log):
    """Wall time of the whole compression of a ~20M-parameter GPT at 8x (mixed, GPTQ)."""
    corpus = debian_text(max_man_pages=60)
    dim, depth = (64, 2) if args.smoke else (512, 6)
    torch.manual_seed(0)
    model = create("char-gpt", vocab_size=corpus.vocab_size, dim=dim, depth=depth, heads=8).eval()
    n_params = sum(p.numel() for p in model.parameters())
    calib = [
        {"input_ids": b["input_ids"][:, :-1]}
        for b in lm_batches(corpus.train, 128, 16, n_batches=8, seed=0)
    ]
    t0 = time.perf_counter()
    cfg = MixedPrecisionConfig(
        quant=WeightOnlyConfig(group_size=64, calibration_batches=None), sensitivity_batches=2
    )
    plan, rep = quantize_mixed_(model, calib, cfg, target_ratio=8, measure=file_bytes)
    t_quant = time.perf_counter() - t0
    data, enc = encode_state_dict(model, EncodeConfig(dense_dtype="fp16"))
    total = time.perf_counter() - t0
    res = {
        "params": n_params,
        "seconds_total": total,
        "seconds_scan_and_gptq": t_quant,
        "seconds_encode": total - t_quant,
        "bytes": len(data),
        "budget": plan.budget,
        "ratio": enc.ratio,
        "gptq_passes": rep.passes,
    }
    # data-aware SVD of the same float model: one calibration pass + one SVD per layer
    torch.manual_seed(0)
    fresh = create("char-gpt", vocab_size=corpus.vocab_size, dim=dim, depth=depth, heads=8).eval()
    t1 = time.perf_counter()
    dec = decompose_whitened_(fresh, WhitenedSVDConfig(rank_fraction=0.5), calib)
    res["seconds_whitened_svd"] = time.perf_counter() - t1
    res["whitened_svd_layers"] = len(dec)
    log(f"20M timing: {res}")
    return res


# ------------------------------------------------------------------------------ report


def _mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return float("nan"), float("nan"), 0
    m = sum(vals) / len(vals)
    s = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return m, s, len(vals)


def summarise(results: dict) -> str:
    lines = ["# Transformers: ViT-tiny (Fashion-MNIST) and char-GPT (Debian text)", ""]
    for part, key, unit in (
        ("vit", "test_drop", "test accuracy drop (points)"),
        ("gpt", "test_increase", "test perplexity increase (%)"),
    ):
        runs = results.get(part)
        if not runs:
            continue
        dense_key = "test_accuracy" if part == "vit" else "test_perplexity"
        dm, _, _ = _mean_std([r["dense"][dense_key] for r in runs])
        lines += [
            f"## {part}: baseline {dense_key} {dm:.4g} (one trained model)",
            "",
            "Rows: mean +- std over the calibration seeds (n); RTN needs no calibration and is "
            "run once; 10x and 12x use the first calibration seed only.",
            "",
        ]
        lines += [f"| ratio | method | file ratio | {unit} | n |", "|---|---|---|---|---|"]
        ratios = sorted({r["ratio_target"] for run in runs for r in run["rows"]})
        for ratio in ratios:
            for method in ("rtn", "gptq", "kmeans", "mixed"):
                rows = [
                    r
                    for run in runs
                    for r in run["rows"]
                    if r["ratio_target"] == ratio and r["method"] == method
                ]
                if not rows:
                    continue
                fm, _, _ = _mean_std([r["ratio"] for r in rows])
                vm, vs, n = _mean_std([r[key] * (100 if part == "gpt" else 1) for r in rows])
                lines.append(f"| {ratio}x | {method} | {fm:.2f} | {vm:.3f} +- {vs:.3f} | {n} |")
        lines.append("")
        eight = [
            r[key]
            for run in runs
            for r in run["rows"]
            if r["ratio_target"] == 8 and r["method"] == "mixed"
        ]
        m, _, n = _mean_std([v * (100 if part == "gpt" else 1) for v in eight])
        target = 0.5 if part == "vit" else 3.0
        verdict = "met" if n and m <= target else "MISSED"
        lines += [
            f"Target 8x with automatic bits: {unit} {m:.3f} (mean of {n}) vs <= {target}: "
            f"**{verdict}**.",
            "",
        ]
        onnx = [run.get("onnx") for run in runs if run.get("onnx")]
        if onnx:
            o = onnx[0]
            lines += [
                "INT8 dynamic onnxruntime (batch 64, 1 thread, seed "
                f"{runs[0]['seed']}): eager {o['eager_ms']:.2f} ms, fp32 ORT {o['fp32_ms']:.2f} ms, "
                f"INT8 ORT {o['int8_ms']:.2f} ms; INT8 output cosine to eager "
                f"{o['int8_cosine_to_eager']:.5f}; file {o['fp32_bytes']:,} -> {o['int8_bytes']:,} bytes.",
                "",
            ]
    t = results.get("time")
    if t:
        verdict = "met" if t["seconds_total"] < 600 else "MISSED"
        lines += [
            f"## Wall time, {t['params'] / 1e6:.1f}M-parameter GPT at 8x (mixed, GPTQ)",
            "",
            f"{t['seconds_total']:.0f} s in total (scan + GPTQ {t['seconds_scan_and_gptq']:.0f} s, "
            f"encode {t['seconds_encode']:.0f} s), file {t['bytes']:,} bytes = {t['ratio']:.2f}x, "
            f"one thread: < 10 minutes **{verdict}**. Whitened SVD (rank fraction 0.5) of the "
            f"same model: {t['seconds_whitened_svd']:.0f} s for {t['whitened_svd_layers']} layers.",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny data, a few batches, seconds")
    p.add_argument(
        "--seeds", default="0,1,2", help="compression seeds (calibration draws) on one baseline"
    )
    p.add_argument("--model-seed", type=int, default=0, help="seed of the trained baseline")
    p.add_argument("--parts", default="vit,gpt,time")
    p.add_argument("--vit-epochs", type=int, default=12)
    p.add_argument("--gpt-steps", type=int, default=1500)
    p.add_argument(
        "--train-only", action="store_true", help="train (and cache) the models of --parts, stop"
    )
    add_results_dir_arg(p)
    args = p.parse_args(argv)
    setup(args)
    global OUT
    if args.smoke:  # the smoke tree, never out/transformers
        OUT = PATHS.out / "transformers"
    if args.smoke:
        args.vit_epochs, args.gpt_steps = 1, 4
        # fewer grid points and bit choices: the same code paths, a third of the encodes and
        # of the sensitivity scan (which dominated the smoke's time)
        global GRID_BITS, GRID_GROUPS, KMEANS_BITS, MIXED
        GRID_BITS, GRID_GROUPS, KMEANS_BITS = (2, 4, 8), (64, None), (2, 4)
        MIXED = dataclasses.replace(MIXED, bit_choices=(2, 4, 8, 16))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.smoke:
        seeds = seeds[:1]
    parts = set(args.parts.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    logf = open(OUT / ("log-smoke.txt" if args.smoke else "log.txt"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        logf.write(line + "\n")
        logf.flush()
        print(line, flush=True)

    if args.train_only:
        corpus = debian_text(max_man_pages=60 if args.smoke else 600) if "gpt" in parts else None
        for seed in seeds:
            if "vit" in parts:
                vit_model(seed, args.vit_epochs, args.smoke, log)
            if "gpt" in parts:
                gpt_model(seed, args.gpt_steps, corpus, args.smoke, log)
        return 0
    t_start = time.perf_counter()
    CACHED_TRAIN_S.clear()  # of this run only (main may be called more than once in a process)
    results = {"smoke": args.smoke, "seeds": seeds}
    if "vit" in parts:
        results["vit"] = part_vit(seeds, args, log)
    if "gpt" in parts:
        results["gpt"] = part_gpt(seeds, args, log)
    if "time" in parts:
        results["time"] = part_time(args, log)
    results["compute_s"] = time.perf_counter() - t_start + sum(CACHED_TRAIN_S)
    name = "transformers-smoke" if args.smoke else "transformers"
    if not args.smoke and parts != {"vit", "gpt", "time"}:
        name += "-" + "-".join(sorted(parts))
    write_result(
        name, results, summarise(results), None if argv is None else ["transformers.py", *argv]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
