"""Linear INT8 / INT4 quantization of the Fashion-MNIST baselines, deployed with onnxruntime.

For each model (LeNet-5, ResNet-20): PyTorch eager fp32, onnxruntime fp32 (BN folded), our INT8
PTQ (QDQ ONNX, several observers, 8-bit and 7-bit weight grids), onnxruntime's own
``quantize_static`` on the same fp32 ONNX file with the same calibration batches, INT4-weight PTQ
and INT4-weight / INT8-activation QAT. Accuracy is measured on the test split by running the
deployed ONNX file in onnxruntime; calibration uses the first N samples of the held-out split.
Latency: median of repeated runs at batch 1 and 64 with ONE thread for both PyTorch and
onnxruntime (intra_op_num_threads=1); the machine is shared, so numbers are noisy.

Run from benchmarks/:  ../.venv/bin/python linear_quant.py [--models lenet-5 resnet-20]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from _common import baseline, git_rev, write_result
from nncompress.data import fashion_mnist
from nncompress.engine import TrainConfig, config_from_dict, evaluate, load_checkpoint
from nncompress.quant.linear import (
    PTQConfig,
    QATConfig,
    layer_precisions,
    quantize_ptq,
    quantize_qat,
)
from nncompress.quant.onnx_export import (
    evaluate_onnx,
    export_onnx,
    make_session,
)

OUT = Path(__file__).resolve().parent / "out" / "linear_quant"
log = logging.getLogger("linear_quant")


def ort_static(fp32_path: Path, out_path: Path, calib: list[torch.Tensor], reduce_range: bool):
    """onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights, uint8 acts."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(fp32_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out_path


def measure(path: Path, splits) -> dict:
    acc = evaluate_onnx(make_session(path), splits.loader("test", 500))["accuracy"]
    return {"accuracy": acc, "bytes": path.stat().st_size}


def interleaved_latency(
    runners: dict[str, Callable[[np.ndarray], None]],
    shape: tuple[int, ...],
    batches: tuple[int, ...],
    rounds: int,
    per_round: dict[int, int],
) -> dict[str, dict[int, float]]:
    """Median ms per run for every runner and batch size, measured round-robin.

    The machine is shared and its load changes minute to minute, so the variants are timed in
    interleaved rounds (order rotated each round): all of them see the same load on average.
    """
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in runners}
    labels = list(runners)
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
        for run in runners.values():  # warm-up
            for _ in range(3):
                run(x)
        for r in range(rounds):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            for label in order:
                for _ in range(per_round[b]):
                    t0 = time.perf_counter()
                    runners[label](x)
                    times[label][b].append(time.perf_counter() - t0)
    return {k: {b: 1000 * float(np.median(v[b])) for b in batches} for k, v in times.items()}


def run_model(name: str, args, splits) -> list[dict]:
    model, side = load_checkpoint(baseline(name))
    model.eval()
    shape = tuple(splits.input_shape)
    meta = {"dataset": splits.describe(), "source": str(baseline(name))}
    out_dir = OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = [x for x, _ in splits.loader("val", 64, limit=args.calibration)]
    calib_loader = splits.loader("val", 64, limit=args.calibration)
    reps = {1: args.repeats_b1, 64: args.repeats_b64}
    rows: list[dict] = []

    def add(method: str, res: dict, **extra) -> None:
        row = {"model": name, "method": method, **res, **extra}
        rows.append(row)
        log.info("%s %s: %s", name, method, {k: v for k, v in row.items() if k != "layers"})

    # fp32 references
    t0 = time.perf_counter()
    acc = evaluate(model, splits.loader("test", 500))["accuracy"]
    add(
        "fp32 PyTorch eager",
        {"accuracy": acc, "bytes": baseline(name).stat().st_size},
        runtime="torch",
    )
    fp32 = export_onnx(model, out_dir / "fp32.onnx", shape, metadata=meta)
    add("fp32 onnxruntime", measure(fp32, splits), runtime="ort", path=str(fp32))

    # our PTQ variants
    variants = [
        ("int8 PTQ minmax", PTQConfig("int8", "uint8", observer="minmax")),
        ("int8 PTQ minmax, 7-bit w", PTQConfig("int8", "uint8", reduce_range=True)),
        (
            "int8 PTQ percentile, 7-bit w",
            PTQConfig("int8", "uint8", observer="percentile", reduce_range=True),
        ),
        ("int8 PTQ kl, 7-bit w", PTQConfig("int8", "uint8", observer="kl", reduce_range=True)),
        ("int4-w PTQ minmax", PTQConfig("int4", "uint8")),
    ]
    keys = ["minmax", "minmax7", "percentile7", "kl7", "int4"]
    for key, (label, cfg) in zip(keys, variants, strict=True):
        if key not in args.ptq_variants:
            continue
        gm = quantize_ptq(model, calib_loader, cfg)
        sim = evaluate(gm, splits.loader("test", 500))["accuracy"]
        path = export_onnx(
            gm,
            out_dir / f"{label.replace(' ', '_').replace(',', '').replace('/', '-')}.onnx",
            shape,
            metadata=meta,
        )
        add(
            label,
            measure(path, splits),
            sim_accuracy=sim,
            runtime="ort",
            path=str(path),
            layers=layer_precisions(gm),
        )

    # onnxruntime's own static quantization of the same fp32 file, same calibration batches
    for rr in (False, True):
        label = "ORT quantize_static" + (", 7-bit w" if rr else "")
        path = ort_static(fp32, out_dir / f"ort_static_rr{int(rr)}.onnx", calib, rr)
        add(label, measure(path, splits), runtime="ort", path=str(path))

    # INT4 weights / INT8 activations with QAT
    train_cfg = config_from_dict(TrainConfig, side["extra"]["train_config"])
    epochs = args.qat_epochs.get(name, 1)
    for key, label, cfg in (
        ("int4", "int4-w QAT", QATConfig("int4", "uint8")),
        (
            "int4-firstlast",
            "int4-w QAT, first/last int8",
            QATConfig("int4", "uint8", keep_first_last="int8"),
        ),
    ):
        wanted = key in args.qat_variants or (key == "int4-firstlast" and args.qat_first_last)
        if not wanted:
            continue
        q0 = time.perf_counter()
        gm = quantize_qat(
            copy.deepcopy(model),
            splits.loader(
                "train", train_cfg.batch_size, augment=train_cfg.augment, limit=args.train_limit
            ),
            cfg,
            TrainConfig(
                epochs=epochs,
                lr=train_cfg.lr,
                schedule="cosine",
                batch_size=train_cfg.batch_size,
                weight_decay=train_cfg.weight_decay,
                augment=train_cfg.augment,
            ),
            calibration_loader=calib_loader,
            lr_scale=args.qat_lr_scale,
        )
        qat_s = time.perf_counter() - q0
        sim = evaluate(gm, splits.loader("test", 500))["accuracy"]
        path = export_onnx(
            gm,
            out_dir / f"{label.replace(' ', '_').replace(',', '').replace('/', '-')}.onnx",
            shape,
            metadata=meta,
        )
        add(
            label,
            measure(path, splits),
            sim_accuracy=sim,
            runtime="ort",
            path=str(path),
            qat_epochs=epochs,
            qat_wall_s=qat_s,
            layers=layer_precisions(gm),
        )

    # latency of every variant, interleaved, same thread count for torch and onnxruntime
    torch.set_num_threads(args.threads)
    runners: dict[str, Callable[[np.ndarray], None]] = {}

    def run_torch(x: np.ndarray) -> None:
        with torch.inference_mode():
            model(torch.from_numpy(x))

    runners["fp32 PyTorch eager"] = run_torch
    for r in rows[1:]:
        sess = make_session(r["path"], args.threads)
        runners[r["method"]] = lambda x, s=sess: s.run(None, {"input": x})
    lat = interleaved_latency(runners, shape, (1, 64), args.rounds, reps)
    torch.set_num_threads(1)
    for r in rows:
        r["latency_ms"] = lat[r["method"]]
    log.info("%s done in %.0f s", name, time.perf_counter() - t0)
    return rows


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown(rows: list[dict], args) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == name]
        base = mr[0]
        ort32 = next(r for r in mr if r["method"] == "fp32 onnxruntime")
        lines += [
            f"### {name} (Fashion-MNIST test, {len(mr)} variants)",
            "",
            "| method | test acc. (ORT) | Δ vs fp32 | sim acc. (torch) | file bytes | "
            "smaller vs fp32 ONNX | ms b=1 | ms b=64 | speed-up b=64 vs ORT fp32 | "
            "vs torch fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mr:
            lat = r["latency_ms"]
            lines.append(
                f"| {r['method']} | {r['accuracy']:.2f} | {r['accuracy'] - base['accuracy']:+.2f} "
                f"| {_fmt(r.get('sim_accuracy'))} | {r['bytes']:,} | "
                f"{ort32['bytes'] / r['bytes']:.2f}x | {lat[1]:.3f} | {lat[64]:.2f} | "
                f"{ort32['latency_ms'][64] / lat[64]:.2f}x | "
                f"{base['latency_ms'][64] / lat[64]:.2f}x |"
            )
        lines.append("")
    lines += [
        f"Calibration: first {args.calibration} held-out samples. Latency: median, "
        f"{args.threads} thread(s) for both PyTorch and onnxruntime, all variants timed in "
        f"{args.rounds} interleaved rounds on a 2-core machine shared with other benchmarks "
        "(noisy; the LeNet-5 rows under heavier load than the ResNet-20 ones). 'sim acc.' is the "
        "PyTorch fake-quantized model; 'test acc.' runs the ONNX file "
        "in onnxruntime (integer kernels for int8). '7-bit w' = weights on [-63, 63] "
        "(reduce_range), which avoids the 16-bit saturation of uint8 x int8 kernels on AVX2 CPUs "
        "without VNNI. int4 weights are stored packed (INT4, opset 21) but run as float "
        "convolutions after dequantization.",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["lenet-5", "resnet-20"])
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--merge", action="store_true", help="keep other models' rows from the last results file"
    )
    p.add_argument("--train-limit", type=int, default=None, help="QAT on the first N (smoke)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds")
    p.add_argument("--repeats-b1", type=int, default=20, help="runs per round at batch 1")
    p.add_argument("--repeats-b64", type=int, default=3, help="runs per round at batch 64")
    p.add_argument("--qat-epochs-lenet", type=int, default=2)
    p.add_argument("--qat-epochs-resnet", type=int, default=2)
    p.add_argument("--qat-lr-scale", type=float, default=0.1)
    p.add_argument(
        "--qat-first-last",
        action="store_true",
        help="also run QAT with the first/last layers at int8",
    )
    p.add_argument(
        "--ptq-variants",
        default="minmax,minmax7,percentile7,kl7,int4",
        help="comma list of PTQ variants: minmax, minmax7, percentile7, kl7, int4",
    )
    p.add_argument("--qat-variants", default="int4", help="comma list: int4, int4-firstlast")
    args = p.parse_args()
    args.ptq_variants = args.ptq_variants.split(",")
    args.qat_variants = args.qat_variants.split(",")
    args.qat_epochs = {"lenet-5": args.qat_epochs_lenet, "resnet-20": args.qat_epochs_resnet}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    splits = fashion_mnist()
    rows = []
    for name in args.models:
        rows += run_model(name, args, splits)
    prev = Path(__file__).resolve().parent / "results" / "linear_quant.json"
    if args.merge and prev.is_file():  # keep earlier rows of models not re-run now
        old = json.loads(prev.read_text()).get("rows", [])
        rows = [r for r in old if r["model"] not in args.models] + rows
        for r in rows:  # JSON turned the latency keys into strings
            r["latency_ms"] = {int(k): v for k, v in r["latency_ms"].items()}
    write_result(
        "linear_quant",
        {"git": git_rev(), "args": {k: v for k, v in vars(args).items()}, "rows": rows},
        markdown(rows, args),
    )
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
