"""Rate-aware compression pipelines on Fashion-MNIST (issue 18 targets): LeNet-300-100 >= 64x
and LeNet-5 >= 100x with at most 0.5 points lost, on the decoded file; LeNet-300-100's
pipeline in <= 5 minutes with one thread.

Each variant is a real recipe run (`run_recipe`) from the baseline checkpoint: magnitude
pruning with retraining (per-layer sparsities from the sensitivity analysis on the held-out
split) -> ``ecsq`` (entropy-constrained sharing with rate-distortion pruning, lambda chosen
on the held-out split) -> centroid ``finetune`` -> ``encode`` with the context coder. Per
seed (the recipe's training seed), the variant kept is the smallest decoded file whose
held-out accuracy is at most 0.5 points below the baseline's; its test accuracy (the decoded
file, evaluated once) and bytes are reported, then mean +- std over the seeds.

Run from benchmarks/:  ../.venv/bin/python rate_aware.py [--models lenet-300-100 lenet-5]
[--seeds 0 1 2] [--smoke]. Runs resume (delete out/rate_aware to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import ROOT, add_results_dir_arg, baseline, out_dir, setup, write_result

OUT = ROOT / "out" / "rate_aware"
MAX_DROP = 0.5
TARGETS = {"lenet-300-100": 64.0, "lenet-5": 100.0}
LAMS = [3e-10, 1e-9, 3e-9, 1e-8, 3e-8, 1e-7, 3e-7]
# the sensitivity analysis' grid: the default (0.1 ... 0.9, 0.95) reaches at most 95% overall,
# so the 96% variants need larger points (the allocation moves layers along this grid)
GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
ENCODE = {"stage": "encode", "codec": "context", "auto_index_bits": True,
          "codebook_dtype": "fp16", "dense_dtype": "fp16"}  # fmt: skip


def _ecsq(bits_conv: int = 6, bits_fc: int = 5, max_val_drop: float = 1.0) -> dict:
    return {"stage": "ecsq", "bits_conv": bits_conv, "bits_fc": bits_fc, "prune": True,
            "lams": LAMS, "max_val_drop": max_val_drop, "fisher_batches": 16}  # fmt: skip


VARIANTS: dict[str, dict[str, list[dict]]] = {
    "lenet-300-100": {
        f"sens{int(100 * s)}+ecsq+context": [
            {
                "stage": "prune",
                "method": "magnitude",
                "sparsity": s,
                "allocate": "sensitivity",
                "sensitivity_sparsities": GRID,
                "iterations": 3,
                "epochs": 10,
                "lr_scale": 0.5,
                "distill": {"temperature": 4, "alpha": 0.7},
            },
            _ecsq(),
            {"stage": "finetune", "epochs": 3, "lr_scale": 0.1},
            ENCODE,
        ]  # fmt: skip
        for s in (0.94, 0.96)
    },
    "lenet-5": {
        "sens96+ecsq+context": [
            {
                "stage": "prune",
                "method": "magnitude",
                "sparsity": 0.96,
                "allocate": "sensitivity",
                "sensitivity_sparsities": GRID,
                "iterations": 3,
                "epochs": 4,
                "lr_scale": 0.5,
            },
            _ecsq(),
            {"stage": "finetune", "epochs": 1, "lr_scale": 0.1, "augment": False},
            ENCODE,
        ]  # fmt: skip
    },
}


def _recipe(model: str, stages: list[dict], seed: int, smoke: bool) -> dict:
    if smoke:
        small = []
        for s in stages:
            s = dict(s)
            if s["stage"] == "prune":
                s.update(iterations=1, epochs=1, sensitivity_batches=1)  # keeps the grid
                s.pop("distill", None)
            if s["stage"] == "finetune":
                s["epochs"] = 1
            if s["stage"] == "ecsq":
                s["lams"] = [1e-9, 1e-7]
                s["fisher_batches"] = 2
            small.append(s)
        return {"name": "smoke", "model": "lenet-300-100", "data": "digits",
                "train": {"epochs": 2, "lr": 0.05, "seed": seed},
                "stages": [{"stage": "train"}, *small]}  # fmt: skip
    import yaml

    shipped = yaml.safe_load((ROOT.parent / f"recipes/deep-compression-{model}.yaml").read_text())
    train = dict(shipped["train"], seed=seed)
    return {"name": f"rate-aware-{model}", "baseline": str(baseline(model)), "train": train,
            "stages": stages}  # fmt: skip


def _val_accuracy(out_dir, splits) -> float:
    from nncompress.engine import evaluate
    from nncompress.stages.encode import decode_to_model

    model = decode_to_model(out_dir / "model.ncz")
    return evaluate(model, splits.loader("val", 512))["accuracy"]


def bench_model(model: str, seeds: list[int], smoke: bool) -> tuple[dict, list[str]]:
    from nncompress.data import digits, fashion_mnist
    from nncompress.engine import evaluate, load_checkpoint
    from nncompress.recipe import load_recipe, run_recipe

    splits = digits() if smoke else fashion_mnist()
    if smoke:
        base_val = base_test = None
    else:
        base, _ = load_checkpoint(baseline(model))
        base_val = evaluate(base, splits.loader("val", 512))["accuracy"]
        base_test = evaluate(base, splits.loader("test", 512))["accuracy"]
    res: dict = {"baseline_val": base_val, "baseline_test": base_test, "seeds": {}}
    for seed in seeds:  # every recipe is validated before the first long run starts
        for stages in VARIANTS[model].values():
            load_recipe(_recipe(model, stages, seed, smoke))
    for seed in seeds:
        runs = {}
        for vname, stages in VARIANTS[model].items():
            out = OUT / ("smoke" if smoke else model) / f"{vname}-seed{seed}"
            t0 = time.perf_counter()
            rep = run_recipe(load_recipe(_recipe(model, stages, seed, smoke)), out, resume=True)
            wall = sum(st["wall_time_s"] for st in rep["stages"] if st["name"] != "train")
            runs[vname] = {
                "bytes": rep["compressed_bytes"],
                "ratio": rep["original_bytes"] / rep["compressed_bytes"],
                "val_accuracy": _val_accuracy(out, splits),
                "test_accuracy": rep["final_accuracy"],  # the decoded file, on test
                "pipeline_wall_s": wall,
                "bench_wall_s": time.perf_counter() - t0,
                "stages": [{k: st[k] for k in ("name", "accuracy", "nonzeros", "size_bytes",
                                               "wall_time_s")} for st in rep["stages"]],
                "ecsq": next((st["report"].get("candidates") for st in rep["stages"]
                              if st["name"] == "ecsq"), None),
            }  # fmt: skip
            print(model, seed, vname, {k: runs[vname][k] for k in ("bytes", "ratio",
                  "val_accuracy", "test_accuracy", "pipeline_wall_s")}, flush=True)  # fmt: skip
        floor = (base_val - MAX_DROP) if base_val is not None else -1.0
        ok = {v: r for v, r in runs.items() if r["val_accuracy"] >= floor}
        chosen = (
            min(ok, key=lambda v: ok[v]["bytes"])
            if ok
            else max(runs, key=lambda v: runs[v]["val_accuracy"])
        )
        res["seeds"][seed] = {"runs": runs, "chosen": chosen, "within_floor": bool(ok)}
    chosen = [s["runs"][s["chosen"]] for s in res["seeds"].values()]
    ratio = [c["ratio"] for c in chosen]
    drop = [(base_test - c["test_accuracy"]) if base_test is not None else 0.0 for c in chosen]
    wall = [c["pipeline_wall_s"] for c in chosen]

    def ms(v, f=".2f"):
        return (
            f"{statistics.mean(v):{f}} +- {statistics.stdev(v):{f}}"
            if len(v) > 1
            else f"{v[0]:{f}}"
        )

    met = statistics.mean(ratio) >= TARGETS[model] and statistics.mean(drop) <= MAX_DROP
    verdict = ("met" if met else "MISSED") if not smoke else "not evaluated (smoke)"
    md = [
        "", f"## {model}", "",
        f"Baseline: val {base_val}, test {base_test} (%). Per seed, the smallest decoded file "
        f"with val accuracy >= baseline val - {MAX_DROP}; where no variant reaches that, the most "
        "accurate on val (marked *below floor*).", "",
        "| seed | variant chosen | bytes | ratio | val acc. % | test acc. % (decoded) | "
        "drop (test) | pipeline wall s |", "|---|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for seed, s in res["seeds"].items():
        c = s["runs"][s["chosen"]]
        d = (base_test - c["test_accuracy"]) if base_test is not None else 0.0
        mark = "" if s["within_floor"] else " (*below floor*)"
        md.append(f"| {seed} | {s['chosen']}{mark} | {c['bytes']:,} | {c['ratio']:.1f}x | "
                  f"{c['val_accuracy']:.2f} | {c['test_accuracy']:.2f} | {d:.2f} | "
                  f"{c['pipeline_wall_s']:.0f} |")  # fmt: skip
    md += [
        "",
        f"Mean over {len(chosen)} seed(s): ratio {ms(ratio, '.1f')}x, drop {ms(drop)} points, "
        f"pipeline {ms(wall, '.0f')} s. Target >= {TARGETS[model]:.0f}x at <= {MAX_DROP} "
        f"points: **{verdict}**.",
        "", "All variants (every seed):", "",
        "| seed | variant | bytes | ratio | val acc. % | test acc. % |", "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for seed, s in res["seeds"].items():
        for v, r in s["runs"].items():
            md.append(f"| {seed} | {v} | {r['bytes']:,} | {r['ratio']:.1f}x | "
                      f"{r['val_accuracy']:.2f} | {r['test_accuracy']:.2f} |")  # fmt: skip
    res.update(mean_ratio=statistics.mean(ratio), mean_drop=statistics.mean(drop),
               mean_pipeline_s=statistics.mean(wall), target_met=met)  # fmt: skip
    return res, md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--smoke", action="store_true", help="digits, tiny runs (seconds)")
    add_results_dir_arg(p)
    args = p.parse_args(argv)
    setup(args)
    global OUT
    OUT = out_dir("rate_aware")
    if args.smoke:
        args.models, args.seeds = ["lenet-300-100"], args.seeds[:1]
    results, md = {}, ["# Rate-aware pipelines (ECSQ + RD pruning + context coding)"]
    for model in args.models:
        res, lines = bench_model(model, args.seeds, args.smoke)
        results[model] = res
        md += lines
        frag = OUT / f"{model}{'-smoke' if args.smoke else ''}.json"
        frag.parent.mkdir(parents=True, exist_ok=True)
        frag.write_text(json.dumps({"results": res, "markdown": lines}, indent=1, default=str))
    # one model per run writes results/rate_aware_<model>.*, both models results/rate_aware.*
    name = "rate_aware" + ("" if len(args.models) > 1 else f"_{args.models[0]}")
    name += "_smoke" if args.smoke else ""
    write_result(
        name,
        {"models": results},
        "\n".join(md),
        None if argv is None else ["rate_aware.py", *argv],
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
