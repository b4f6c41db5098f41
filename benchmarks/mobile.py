"""Mobile CNNs (MobileNetV2, EfficientNet-style) through nncompress's transforms (issue 20).

Parts (``--parts``, comma-separated; default all but ``baselines``):

* ``baselines``: train one baseline per net with the fixed recipe in RECIPES (recorded in the
  checkpoint's sidecar and in results/mobile.json); the test split is evaluated once.
* ``int8``: MobileNetV2 INT8 PTQ exported through ``torch.onnx.export`` in QDQ form and run by
  onnxruntime, against onnxruntime's own ``quantize_static`` on the exported float graph;
  accuracy and latency at batch 1 and 64 against onnxruntime fp32, and a per-operator profile
  of where the integer model spends its time (depthwise vs pointwise convolutions).
* ``filter``: L1 filter pruning to 70% of the MACs through the channel dependency graph
  (depthwise convs, residual adds), fine-tuned, with the dense model fine-tuned for the same
  epochs as a control; Torch-Pruning beside it only when it is installed.
* ``deep``: Deep Compression (magnitude pruning with retraining, k-means weight sharing,
  entropy-coded ``.ncz``) aiming at >= 20x at <= 0.5 points.

Every choice is made on the held-out split; the test split is evaluated once per reported
row. ``--smoke`` runs every part on tiny synthetic data with tiny nets (seconds).

    python benchmarks/mobile.py --parts baselines --nets mobilenet-v2
    python benchmarks/mobile.py --parts int8,filter,deep --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PATHS, ROOT, add_results_dir_arg, setup, write_result  # noqa: E402
from nncompress.engine import (  # noqa: E402
    TrainConfig,
    config_to_dict,
    evaluate,
    fit,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from nncompress.models import create  # noqa: E402
from nncompress.stats import measure_latency  # noqa: E402

#: one baseline per net: constructor arguments and the training recipe (fixed in advance)
RECIPES: dict[str, tuple[dict, TrainConfig]] = {
    "mobilenet-v2": (
        {"num_classes": 10, "in_channels": 1, "width_mult": 1.0},
        TrainConfig(epochs=10, lr=0.1, weight_decay=1e-4, augment=True, seed=0),
    ),
    "efficientnet-lite": (
        {"num_classes": 10, "in_channels": 1, "width_mult": 0.75},
        TrainConfig(epochs=8, lr=0.1, weight_decay=1e-4, augment=True, seed=0),
    ),
}
SMOKE_KWARGS = {"width_mult": 0.25}
OUT = ROOT / "out" / "mobile"


def load_splits(smoke: bool):
    from nncompress.data import fashion_mnist, synthetic

    if smoke:
        return synthetic(n=384, shape=(1, 28, 28), num_classes=10)
    return fashion_mnist()


def baseline_path(name: str, smoke: bool) -> Path:
    return (OUT / "smoke" if smoke else PATHS.baselines) / f"{name}.safetensors"


def train_baseline(name: str, splits, smoke: bool) -> dict:
    """Train ``name`` with its recipe, save it, evaluate the test split once."""
    kwargs, cfg = RECIPES[name]
    if smoke:
        kwargs = {**kwargs, **SMOKE_KWARGS}
        cfg = cfg.replace(epochs=1, batch_size=64)
    seed_everything(cfg.seed)
    model = create(name, **kwargs).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    history = fit(
        model,
        splits.loader("train", cfg.batch_size, seed=cfg.seed, augment=cfg.augment),
        cfg,
        val_loader=splits.loader("val", 512),
    )
    wall = time.perf_counter() - t0
    test = evaluate(model, splits.loader("test", 512))
    metrics = {
        "test_accuracy": test["accuracy"],
        "val_accuracy": history.last.get("val_accuracy"),
        "train_wall_time_s": wall,
        "epoch_wall_time_s": wall / max(1, cfg.epochs),
    }
    path = baseline_path(name, smoke)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        model,
        path,
        model_name=name,
        model_kwargs=kwargs,
        dataset=splits.describe(),
        metrics=metrics,
        history=history.epochs,
        extra={"train_config": config_to_dict(cfg)},
    )
    row = {
        "model": name,
        "kwargs": kwargs,
        "recipe": config_to_dict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        **metrics,
    }
    (path.with_suffix(".row.json")).write_text(json.dumps(row, indent=2))
    print(
        f"{name}: test {test['accuracy']:.2f}% (val {metrics['val_accuracy']:.2f}%), "
        f"{wall / max(1, cfg.epochs):.0f} s/epoch",
        flush=True,
    )
    return row


def baseline_row(name: str, splits, smoke: bool) -> dict:
    """The row of a baseline trained by an earlier run (its checkpoint and row file exist),
    else train it: a run resumes after the nets it finished."""
    path = baseline_path(name, smoke).with_suffix(".row.json")
    if path.is_file() and baseline_path(name, smoke).is_file():
        print(f"{name}: baseline exists ({path}), not retrained", flush=True)
        return json.loads(path.read_text())
    return train_baseline(name, splits, smoke)


def get_baseline(name: str, splits, smoke: bool):
    path = baseline_path(name, smoke)
    if not path.is_file():
        if not smoke:
            sys.exit(f"baseline {path} missing: run --parts baselines --nets {name} first")
        train_baseline(name, splits, smoke)
    model, sidecar = load_checkpoint(path)
    return model.eval(), sidecar


# ------------------------------------------------------------------------------ helpers


def heldout_splits(splits):
    """A copy whose test split is the held-out split: what runs inside a pipeline (stage
    reports, restore-best) never sees the real test split."""
    return dataclasses.replace(splits, test=splits.val)


def acc(model, splits, split: str) -> float:
    return evaluate(model, splits.loader(split, 500))["accuracy"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs: list[float], d: int = 2) -> str:
    m, s = mean_std(xs)
    return f"{m:.{d}f} +- {s:.{d}f}" if len(xs) > 1 else f"{m:.{d}f} (1 seed)"


def torch_latency(model, shape, smoke: bool) -> dict[str, float]:
    reps = 3 if smoke else 30
    return {
        f"batch_{b}": measure_latency(model, shape, b, repeats=reps, warmup=2 if smoke else 5)
        for b in (1, 64)
    }


#: compute seconds of every row the current part used (None: a row cached without its time)
ROW_TIMES: list[float | None] = []


def cached(name: str, smoke: bool, fn):
    """Run ``fn()`` once per ``name`` (a finished row is reused when a run resumes); its wall
    time is kept beside it (NAME.time.json) so that a resumed part still knows its compute."""
    path = (OUT / ("smoke" if smoke else "rows")) / f"{name}.json"
    timing = path.with_suffix(".time.json")
    if path.is_file():
        ROW_TIMES.append(json.loads(timing.read_text())["wall_s"] if timing.is_file() else None)
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    row = fn()
    ROW_TIMES.append(time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2, default=str))
    timing.write_text(json.dumps({"wall_s": ROW_TIMES[-1]}))
    return row


# --------------------------------------------------------------------------------- parts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="int8,filter,deep")
    ap.add_argument("--nets", default="mobilenet-v2,efficientnet-lite")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--smoke", action="store_true")
    add_results_dir_arg(ap)
    args = ap.parse_args(argv)
    setup(args)
    if args.smoke:  # the smoke tree, never out/mobile (mobile_parts reads mobile.OUT)
        global OUT
        OUT = PATHS.out / "mobile"
    splits = load_splits(args.smoke)
    parts = [p for p in args.parts.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.smoke:
        seeds = seeds[:1]
    unknown = sorted(set(parts) - {"baselines", "int8", "filter", "deep"})
    if unknown:
        sys.exit(f"--parts: unknown {unknown}; allowed baselines,int8,filter,deep")
    if "baselines" in parts:
        rows = [baseline_row(n, splits, args.smoke) for n in args.nets.split(",") if n]
        compute = sum(r["train_wall_time_s"] for r in rows)  # resumed nets included
        data = {"rows": rows, "compute_s": compute}
        write_result("mobile_baselines", data, _baseline_md(rows), _argv(argv))
    import mobile as parts_view  # the module mobile_parts uses (a second copy when run as a script)
    from mobile_parts import run_deep, run_filter, run_int8

    times = parts_view.ROW_TIMES

    for part, fn in (("int8", run_int8), ("filter", run_filter), ("deep", run_deep)):
        if part in parts:
            model, sidecar = get_baseline("mobilenet-v2", splits, args.smoke)
            times.clear()
            data, md = fn(model, sidecar, splits, seeds, args.smoke)
            # the part's compute: its rows' wall times (None if a row's time was not kept)
            data["compute_s"] = None if None in times else sum(times)
            print(md, flush=True)
            write_result(f"mobile_{part}", data, md, _argv(argv))


def _argv(argv: list[str] | None) -> list[str] | None:
    return None if argv is None else ["mobile.py", *argv]


def _baseline_md(rows: list[dict]) -> str:
    md = [
        "| model | params | test acc (%) | val acc (%) | s/epoch | epochs | lr | wd | augment |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rc = r["recipe"]
        md.append(
            f"| {r['model']} {r['kwargs'].get('width_mult', '')} | {r['params']:,} | "
            f"{r['test_accuracy']:.2f} | {r['val_accuracy']:.2f} | "
            f"{r['epoch_wall_time_s']:.0f} | {rc['epochs']} | {rc['lr']} | "
            f"{rc['weight_decay']} | {rc['augment']} |"
        )
    return "\n".join(md)


if __name__ == "__main__":
    main()
