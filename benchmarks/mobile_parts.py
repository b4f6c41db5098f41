"""The measured parts of ``benchmarks/mobile.py`` (MobileNetV2 on Fashion-MNIST): INT8 in
onnxruntime, filter pruning to 70% of the MACs, Deep Compression. See mobile.py's docstring."""

from __future__ import annotations

import copy
import json
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from mobile import OUT, acc, cached, heldout_splits, pm, torch_latency
from nncompress.engine import TrainConfig, finetune, load_checkpoint
from nncompress.quant import PTQConfig, fold_batchnorm_, quantize_ptq
from nncompress.quant.linear import quantization_coverage
from nncompress.quant.onnx_export import (
    evaluate_onnx,
    export_onnx,
    make_session,
    measure_onnx_latency,
)
from nncompress.stats import count_macs

SHAPE = (1, 28, 28)


def _train_cfg(sidecar: dict) -> TrainConfig:
    saved = (sidecar.get("extra") or {}).get("train_config") or {}
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def _calibration(splits, seed: int, n: int):
    """``n`` held-out images chosen by ``seed`` (the calibration set of one seed)."""
    x, y = splits.val
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    from nncompress.data.datasets import BatchLoader

    return BatchLoader(x[idx], y[idx], 64, shuffle=False)


# ------------------------------------------------------------------------------------ INT8


def _ort_latency(path: Path, smoke: bool) -> dict[str, float]:
    sess = make_session(path, 1)
    reps = 3 if smoke else 50
    return {f"batch_{b}": measure_onnx_latency(sess, SHAPE, b, repeats=reps) for b in (1, 64)}


def _op_profile(path: Path, smoke: bool) -> dict[str, float]:
    """Share of onnxruntime's kernel time (batch 64, 1 thread) per operator class: depthwise,
    pointwise (1x1) and other convolutions told apart by the optimised graph's attributes."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)
        name = sess.get_inputs()[0].name
        for _ in range(2 if smoke else 20):
            sess.run(None, {name: x})
        prof = json.loads(Path(sess.end_profiling()).read_text())
        kind = {}
        for n in onnx.load(str(Path(tmp) / "opt.onnx")).graph.node:
            if "Conv" in n.op_type:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                k = list(attrs.get("kernel_shape") or [])
                grp = attrs.get("group", 1)
                kind[n.name] = (
                    f"{n.op_type} depthwise"
                    if grp > 1
                    else f"{n.op_type} 1x1"
                    if k == [1, 1]
                    else f"{n.op_type} kxk"
                )
    times: dict[str, float] = {}
    for ev in prof:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        key = kind.get(node, ev.get("args", {}).get("op_name", "?"))
        times[key] = times.get(key, 0.0) + float(ev.get("dur", 0))
    total = sum(times.values()) or 1.0
    return {k: round(100.0 * v / total, 1) for k, v in sorted(times.items(), key=lambda t: -t[1])}


def _ort_static(fp32: Path, out: Path, calib) -> Path:
    """onnxruntime's own quantizer on the exported float graph (QDQ, per-channel 7-bit weights,
    uint8 activations, min/max calibration on the same images)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x, _ in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def run_int8(model, sidecar, splits, seeds, smoke):
    tag = "smoke" if smoke else "rows"
    work = OUT / tag / "int8"
    work.mkdir(parents=True, exist_ok=True)
    n_cal = 128 if smoke else 512
    fp32 = export_onnx(model, work / "fp32.onnx", SHAPE)
    ho = heldout_splits(splits)

    def fp32_row():
        return {
            "val": evaluate_onnx(fp32, ho.loader("test", 500))["accuracy"],
            "test": evaluate_onnx(fp32, splits.loader("test", 500))["accuracy"],
            "latency_ms": _ort_latency(fp32, smoke),
            "profile": _op_profile(fp32, smoke),
            "bytes": fp32.stat().st_size,
        }

    base = cached("int8-fp32", smoke, fp32_row)

    # the one choice: the observer, on the held-out accuracy of seed 0's ONNX model
    def choose():
        out = {}
        for obs in ("minmax", "percentile"):
            gm = quantize_ptq(
                model, _calibration(splits, 0, n_cal), PTQConfig(activations="uint8", observer=obs)
            )
            p = export_onnx(gm, work / f"choose-{obs}.onnx", SHAPE)
            out[obs] = evaluate_onnx(p, ho.loader("test", 500))["accuracy"]
        return out

    choice = cached("int8-choice", smoke, choose)
    observer = max(choice, key=choice.get)

    rows = {"ours": [], "ort": []}
    for seed in seeds:

        def ours(seed=seed):
            gm = quantize_ptq(
                model,
                _calibration(splits, seed, n_cal),
                PTQConfig(activations="uint8", observer=observer),
            )
            cov = quantization_coverage(gm)
            p = export_onnx(gm, work / f"ours-{seed}.onnx", SHAPE)
            return {
                "seed": seed,
                "val": evaluate_onnx(p, ho.loader("test", 500))["accuracy"],
                "test": evaluate_onnx(p, splits.loader("test", 500))["accuracy"],
                "sim_val": acc(gm, splits, "val"),
                "bytes": p.stat().st_size,
                "quantized_layers": len(cov.changed),
                "float_layers": {x.name: x.detail for x in cov.skipped},
                "latency_ms": _ort_latency(p, smoke) if seed == seeds[0] else None,
                "profile": _op_profile(p, smoke) if seed == seeds[0] else None,
            }

        def ort(seed=seed):
            p = _ort_static(fp32, work / f"ort-{seed}.onnx", _calibration(splits, seed, n_cal))
            return {
                "seed": seed,
                "val": evaluate_onnx(p, ho.loader("test", 500))["accuracy"],
                "test": evaluate_onnx(p, splits.loader("test", 500))["accuracy"],
                "bytes": p.stat().st_size,
                "latency_ms": _ort_latency(p, smoke) if seed == seeds[0] else None,
            }

        rows["ours"].append(cached(f"int8-ours-{observer}-{seed}", smoke, ours))
        rows["ort"].append(cached(f"int8-ort-{seed}", smoke, ort))
    data = {"fp32": base, "observer_choice": choice, "observer": observer, **rows}
    return data, _int8_md(data)


def _int8_md(d: dict) -> str:
    b = d["fp32"]
    lat = b["latency_ms"]
    md = [
        "### MobileNetV2-FMNIST, INT8 in onnxruntime (1 thread)",
        "",
        f"Observer chosen on held-out (seed 0): {d['observer']} "
        f"({', '.join(f'{k} {v:.2f}%' for k, v in d['observer_choice'].items())}).",
        "",
        "| model | test acc (%) | points lost | file bytes | batch 1 ms | speed-up | "
        "batch 64 ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 (onnxruntime) | {b['test']:.2f} | - | {b['bytes']:,} | {lat['batch_1']:.3f} | "
        f"1.00x | {lat['batch_64']:.2f} | 1.00x |",
    ]
    for key, label in (("ours", "INT8 PTQ, ours (QDQ via torch.onnx.export)"),
                       ("ort", "INT8, onnxruntime quantize_static")):  # fmt: skip
        rs = d[key]
        tests = [r["test"] for r in rs]
        l0 = rs[0]["latency_ms"]
        md.append(
            f"| {label} | {pm(tests)} | {b['test'] - float(np.mean(tests)):+.2f} | "
            f"{rs[0]['bytes']:,} | {l0['batch_1']:.3f} | {lat['batch_1'] / l0['batch_1']:.2f}x | "
            f"{l0['batch_64']:.2f} | {lat['batch_64'] / l0['batch_64']:.2f}x |"
        )
    ours = d["ours"][0]
    lost = b["test"] - float(np.mean([r["test"] for r in d["ours"]]))
    l0 = ours["latency_ms"]
    md += [
        "",
        f"Target: <= 0.5 points lost in onnxruntime: {'met' if lost <= 0.5 else '**missed**'} "
        f"({lost:.2f} points on the mean); speed-up over fp32 "
        f"{lat['batch_1'] / l0['batch_1']:.2f}x at batch 1, "
        f"{lat['batch_64'] / l0['batch_64']:.2f}x at batch 64.",
        "",
        f"Our file quantizes {ours['quantized_layers']} Conv/Linear layers; left in float: "
        f"{ours['float_layers'] or 'none'}. Seeds change the 512 held-out calibration images; "
        "latency is measured on seed 0's file.",
        "",
        "Share of onnxruntime kernel time at batch 64 (fp32 / ours):",
        "",
        "| operator | fp32 % | int8 % |",
        "|---|---:|---:|",
    ]
    prof_f, prof_q = b["profile"], ours["profile"] or {}
    for k in sorted(
        set(prof_f) | set(prof_q), key=lambda k: -(prof_f.get(k, 0) + prof_q.get(k, 0))
    ):
        md.append(f"| {k} | {prof_f.get(k, 0):.1f} | {prof_q.get(k, 0):.1f} |")
    return "\n".join(md)


# ------------------------------------------------------------------------- filter pruning


def _finetune(model, splits, cfg: TrainConfig, seed: int, epochs: int, lr_scale: float):
    """Fine-tune on train, restore the best held-out epoch (choice on held-out)."""
    tcfg = cfg.replace(epochs=epochs, seed=seed, restore_best=True)
    hist = finetune(
        model,
        splits.loader("train", tcfg.batch_size, seed=seed, augment=tcfg.augment),
        tcfg,
        lr_scale=lr_scale,
        val_loader=splits.loader("val", 500),
    )
    return hist


def run_filter(model, sidecar, splits, seeds, smoke):
    from nncompress.prune import FilterPruneConfig, prune_filters_

    cfg = _train_cfg(sidecar)
    epochs = 1 if smoke else 3
    lr_scale = 0.1
    dense_macs = sum(d for d, _ in count_macs(model, SHAPE).values())
    base = {"val": acc(model, splits, "val"), "test": acc(model, splits, "test"),
            "macs": dense_macs, "latency_ms": torch_latency(model, SHAPE, smoke)}  # fmt: skip
    rows = []
    for seed in seeds:

        def one(seed=seed):
            m = copy.deepcopy(model)
            rep = prune_filters_(
                m, FilterPruneConfig(macs_budget=0.7, criterion="l1"), torch.zeros(1, *SHAPE)
            )
            val0 = acc(m, splits, "val")
            _finetune(m, splits, cfg, seed, epochs, lr_scale)
            macs = sum(d for d, _ in count_macs(m, SHAPE).values())
            return {
                "seed": seed,
                "val_pruned": val0,
                "val": acc(m, splits, "val"),
                "test": acc(m, splits, "test"),
                "macs": macs,
                "params": sum(p.numel() for p in m.parameters()),
                "latency_ms": torch_latency(m, SHAPE, smoke) if seed == seeds[0] else None,
                "coverage": rep.coverage.to_dict() if hasattr(rep, "coverage") else None,
            }

        rows.append(cached(f"filter-{seed}", smoke, one))

    def control():
        m = copy.deepcopy(model)
        _finetune(m, splits, cfg, seeds[0], epochs, lr_scale)
        return {"seed": seeds[0], "val": acc(m, splits, "val"), "test": acc(m, splits, "test")}

    ctrl = cached("filter-control", smoke, control)

    def torch_pruning():
        # Torch-Pruning's L1 magnitude pruner, one uniform ratio bisected to our pruned MACs,
        # then the same fine-tuning as ours (seed 0)
        from importlib.metadata import version

        from pruning_li import tp_prune

        m, wall, ratio = tp_prune(model, torch.zeros(1, *SHAPE), SHAPE, rows[0]["macs"])
        val0 = acc(m, splits, "val")
        _finetune(m, splits, cfg, seeds[0], epochs, lr_scale)
        return {
            "method": f"Torch-Pruning {version('torch-pruning')} L1 (uniform ratio, all groups)",
            "seed": seeds[0],
            "ratio": ratio,
            "prune_wall_s": wall,
            "val_pruned": val0,
            "val": acc(m, splits, "val"),
            "test": acc(m, splits, "test"),
            "macs": sum(d for d, _ in count_macs(m, SHAPE).values()),
            "params": sum(p.numel() for p in m.parameters()),
            "latency_ms": torch_latency(m, SHAPE, smoke),
        }

    data = {"baseline": base, "pruned": rows, "control": ctrl, "epochs": epochs,
            "lr_scale": lr_scale, "torch_pruning": None}  # fmt: skip
    if find_spec("torch_pruning") is None:
        data["runs"] = [{"skipped": ["Torch-Pruning row: torch-pruning is not installed "
                                     "(pip install '.[compare]')"]}]  # fmt: skip
    else:
        data["torch_pruning"] = cached("filter-torch-pruning", smoke, torch_pruning)
    return data, _filter_md(data)


def _filter_md(d: dict) -> str:
    b, rs, c = d["baseline"], d["pruned"], d["control"]
    tests = [r["test"] for r in rs]
    lb, lp = b["latency_ms"], rs[0]["latency_ms"]
    lost = b["test"] - float(np.mean(tests))
    met = lost <= 0.5 and rs[0]["macs"] <= 0.7 * b["macs"]
    return "\n".join(
        [
            "### MobileNetV2-FMNIST, L1 filter pruning to 70% of the MACs (PyTorch, 1 thread)",
            "",
            f"Fine-tuned {d['epochs']} epochs at {d['lr_scale']}x the training rate, best "
            "held-out epoch restored; the dense control gets the same fine-tuning (seed "
            f"{c['seed']} only).",
            "",
            "| model | test acc (%) | vs baseline | vs control | MACs | params | "
            "batch 1 ms | batch 64 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| dense baseline | {b['test']:.2f} | - | - | {b['macs']:,} | - | "
            f"{lb['batch_1']:.2f} | {lb['batch_64']:.1f} |",
            f"| dense control (fine-tuned) | {c['test']:.2f} | {c['test'] - b['test']:+.2f} | - | "
            f"{b['macs']:,} | - | - | - |",
            f"| filter-pruned + fine-tuned | {pm(tests)} | "
            f"{float(np.mean(tests)) - b['test']:+.2f} | {float(np.mean(tests)) - c['test']:+.2f} | "
            f"{rs[0]['macs']:,} ({100 * rs[0]['macs'] / b['macs']:.0f}%) | {rs[0]['params']:,} | "
            f"{lp['batch_1']:.2f} | {lp['batch_64']:.1f} |",
            *_tp_line(d.get("torch_pruning"), b, c),
            "",
            f"Held-out accuracy right after pruning (before fine-tuning): "
            f"{pm([r['val_pruned'] for r in rs])}%.",
            "",
            f"Target: <= 0.5 points lost at <= 70% of the MACs: "
            f"{'met' if met else '**missed**'} ({lost:.2f} points lost on the mean, "
            f"{100 * rs[0]['macs'] / b['macs']:.1f}% of the MACs).",
        ]
    )


def _tp_line(t: dict | None, b: dict, c: dict) -> list[str]:
    if not t:
        return []
    lat = t["latency_ms"]
    return [
        f"| {t['method']}, same fine-tuning (seed {t['seed']}) | {t['test']:.2f} (1 seed) | "
        f"{t['test'] - b['test']:+.2f} | {t['test'] - c['test']:+.2f} | "
        f"{t['macs']:,} ({100 * t['macs'] / b['macs']:.0f}%) | "
        f"{t['params']:,} | {lat['batch_1']:.2f} | {lat['batch_64']:.1f} |"
    ]


# ----------------------------------------------------------------------- Deep Compression


def run_deep(model, sidecar, splits, seeds, smoke):
    """fold BatchNorm -> prune (global magnitude, 2 iterations with retraining) -> share (5-bit
    k-means) ->
    centroid fine-tuning -> encode (.ncz, Huffman); the pipeline runs on a copy of the data
    whose test split is the held-out split; the decoded file is evaluated on test once."""
    from nncompress.io import decode_to_checkpoint
    from nncompress.stages.base import StageContext
    from nncompress.stages.registry import stage_entry

    cfg = _train_cfg(sidecar)
    arch = sidecar.get("architecture") or {}
    ho = heldout_splits(splits)
    stages = [
        ("prune", {"method": "magnitude", "sparsity": 0.85, "scope": "global",
                   "iterations": 2, "epochs": 1 if smoke else 2, "lr_scale": 0.1}),
        ("share", {"bits_conv": 5, "bits_fc": 5, "init": "linear"}),
        ("finetune", {"epochs": 1, "lr_scale": 0.02, "augment": False}),
        ("encode", {"codec": "huffman", "auto_index_bits": True, "codebook_dtype": "fp16",
                    "dense_dtype": "fp16"}),
    ]  # fmt: skip
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    base = {"val": acc(model, splits, "val"), "test": acc(model, splits, "test"),
            "dense_bytes": dense_bytes}  # fmt: skip
    rows = []
    for seed in seeds:

        def one(seed=seed):
            out = OUT / ("smoke" if smoke else "rows") / f"deep-{seed}"
            out.mkdir(parents=True, exist_ok=True)
            folded = copy.deepcopy(model)
            # BatchNorm's four fp16 vectors per channel alone are ~26 KB of MobileNetV2's
            # 596 KB, more than a 20x file can hold: fold them into the convolutions first
            fold_batchnorm_(folded)
            ctx = StageContext(
                model=folded,
                splits=ho,
                model_name=arch.get("model"),
                model_kwargs=arch.get("kwargs") or {},
                train_config=cfg.replace(seed=seed),
                out_dir=out,
            )
            trace = []
            for name, fields in stages:
                cls, fn = stage_entry(name)
                rep = fn(ctx, cls.from_dict(fields)) or {}
                trace.append({"stage": name, "val": acc(ctx.model, splits, "val"),
                              "coverage": rep.get("coverage")})  # fmt: skip
            ncz = ctx.artifacts["ncz"]
            ck = decode_to_checkpoint(ncz, out / "decoded.safetensors")
            decoded, _ = load_checkpoint(ck)
            return {
                "seed": seed,
                "stages": trace,
                "val": acc(decoded, splits, "val"),
                "test": acc(decoded, splits, "test"),
                "bytes": ncz.stat().st_size,
                "ratio": dense_bytes / ncz.stat().st_size,
            }

        rows.append(cached(f"deep-{seed}", smoke, one))

    def control():
        # the dense model with the same extra training (prune retraining + fine-tuning epochs)
        m = copy.deepcopy(model)
        epochs = sum(f.get("epochs", 0) * f.get("iterations", 1) for _, f in stages)
        _finetune(m, splits, cfg, seeds[0], epochs, 0.1)
        return {"seed": seeds[0], "epochs": epochs, "test": acc(m, splits, "test"),
                "val": acc(m, splits, "val")}  # fmt: skip

    ctrl = cached("deep-control", smoke, control)
    data = {"baseline": base, "rows": rows, "stages": stages, "control": ctrl}
    return data, _deep_md(data)


def _deep_md(d: dict) -> str:
    b, rs = d["baseline"], d["rows"]
    tests, ratios = [r["test"] for r in rs], [r["ratio"] for r in rs]
    lost = b["test"] - float(np.mean(tests))
    met = float(np.mean(ratios)) >= 20 and lost <= 0.5
    md = [
        "### MobileNetV2-FMNIST, Deep Compression (prune -> share -> fine-tune -> Huffman)",
        "",
        "| model | test acc (%) | points lost | bytes | compression |",
        "|---|---:|---:|---:|---:|",
        f"| dense fp32 | {b['test']:.2f} | - | {b['dense_bytes']:,} | 1x |",
        f"| dense control ({d['control']['epochs']} epochs fine-tuned, seed "
        f"{d['control']['seed']}) | {d['control']['test']:.2f} | "
        f"{b['test'] - d['control']['test']:+.2f} | - | - |",
        f"| decoded .ncz | {pm(tests)} | {lost:+.2f} | {int(np.mean([r['bytes'] for r in rs])):,} "
        f"| {pm(ratios, 1)}x |",
        "",
        f"Target >= 20x at <= 0.5 points lost: {'met' if met else '**missed**'} (on the means).",
        "Stages (fixed in advance): "
        + "; ".join(f"{n} {json.dumps(f, sort_keys=True)}" for n, f in d["stages"]),
        "",
        "Held-out accuracy after each stage (seed "
        f"{rs[0]['seed']}): " + ", ".join(f"{t['stage']} {t['val']:.2f}%" for t in rs[0]["stages"]),
    ]
    return "\n".join(md)
