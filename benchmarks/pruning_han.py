"""Han et al. 2015 Table 1 style connection pruning on the Fashion-MNIST LeNet baselines.

For each LeNet (defaults = the published settings of each model, in PUBLISHED below):

1. Sensitivity analysis on the held-out split (one layer at a time, no retraining).
2. Per-layer sparsities: the paper's (``--per-layer``, the default) or, with
   ``--per-layer sensitivity``, from the curves (greedy: smallest held-out loss per removed
   weight first) reaching ``--target`` x fewer nonzero parameters (biases included).
3. nncompress, for every seed: iterative pruning (``--iterations`` prune -> retrain cycles,
   kept fraction shrinking geometrically, ``--epochs`` retraining epochs each at
   ``--lr-scale`` times the baseline's learning rate, optionally with knowledge distillation
   from the unpruned baseline), then dead-neuron removal. Held-out accuracy after every
   iteration; the test split once at the end.
4. ``torch.nn.utils.prune`` with the same per-layer sparsities and budget (``l1_unstructured``,
   same loop), and optionally (first seed only: a side comparison) its ``global_unstructured``
   beside ours with global ranking;
   ``torch.save`` bytes of its pruned state dict versus our checkpoints.
5. The dense control: the baseline fine-tuned with the same budget (iterations x epochs at the
   same lr scale, same distillation and augmentation), same seed.

Per-(model, seed) results are cached in out/pruning_han/MODEL-sSEED.json (runs resume); every
run rewrites results/pruning_han.{json,md} from all cached runs.

Run from benchmarks/:  python pruning_han.py [--models lenet-300-100,lenet-5] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import re
import time

import torch
import zstandard
from torch import nn
from torch.nn.utils import prune as tprune

from _common import (
    Phase,
    add_protocol_args,
    baseline,
    dense_control,
    load_splits,
    mean_std,
    out_dir,
    pm,
    setup,
    summary_row,
    write_result,
)
from nncompress.distill import DistillConfig, distillation_loss
from nncompress.engine import (
    TrainConfig,
    atomic_write,
    config_from_dict,
    evaluate,
    finetune,
    load_checkpoint,
    save_checkpoint,
)
from nncompress.prune import (
    MagnitudeConfig,
    folded_copy,
    iterative_prune,
    pruning_masks,
    remove_dead_neurons_,
    sensitivity_analysis,
    sparsities_for_budget,
    write_sensitivity,
)

log = logging.getLogger("pruning_han")

PAPER = {
    "lenet-300-100": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
    "lenet-5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
}
PAPER_TOTAL = {"lenet-300-100": "267K -> 22K (12x)", "lenet-5": "431K -> 36K (12x)"}
TARGET_X, TARGET_LOSS = 12.0, 0.3  # issue 3: >= 12x fewer nonzeros, <= 0.3 points lost
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98,
        0.99)  # fmt: skip
# The published settings per model (the paper's kept fractions; LeNet-5 fc1 at 7.5% so that
# the whole model, biases included, has 12x fewer nonzeros). These were fixed in earlier
# sessions whose runs printed test accuracy (issue 12); they are frozen here and every run
# records held-out accuracy beside the single test evaluation.
PUBLISHED = {
    "lenet-300-100": {
        "iterations": 3,
        "epochs": 10,
        "lr_scale": 0.5,
        "distill": "4,0.7",
        "per_layer": "fc1=0.92,fc2=0.91,fc3=0.74",
        "augment": False,
        "torch_global": True,
    },
    "lenet-5": {
        "iterations": 3,
        "epochs": 5,
        "lr_scale": 0.5,
        "distill": None,
        "per_layer": "conv1=0.34,conv2=0.88,fc1=0.925,fc2=0.81",
        "augment": False,
        "torch_global": False,
    },
}


def nonzeros(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero params) of the effective model (masks applied; torch prune hooks too)."""
    params = nz = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            t = getattr(m, name[: -len("_orig")]) if name.endswith("_orig") else p
            params += t.numel()
            nz += int(torch.count_nonzero(t))
    return params, nz


def torch_save_bytes(state: dict) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue())


def zstd_bytes(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=19).compress(data))


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def torch_prune_run(model, per_layer, global_sparsity, s) -> nn.Module:
    """torch.nn.utils.prune with our iterative schedule: at iteration i each layer's kept
    fraction is (1 - s) ** (i / iterations); torch's ``amount`` is relative to the still
    unpruned weights, so it is 1 - kept_i / kept_{i-1}."""
    layers = layers_of(model)
    n_it = s["iterations"]
    for i in range(1, n_it + 1):

        def amount(sp: float, i: int = i) -> float:
            return 1 - (1 - sp) ** (i / n_it) / (1 - sp) ** ((i - 1) / n_it)

        if global_sparsity is None:
            for n, m in layers.items():
                tprune.l1_unstructured(m, "weight", amount=amount(per_layer[n]))
        else:
            tprune.global_unstructured(
                [(m, "weight") for m in layers.values()],
                pruning_method=tprune.L1Unstructured,
                amount=amount(global_sparsity),
            )
        finetune(
            model,
            s["train_loader"],
            s["retrain"],
            lr_scale=s["lr_scale"],
            val_loader=s["val_loader"],
            loss_fn=s["loss_fn"],
        )
    return model


def settings_of(name: str, args) -> dict:
    s = dict(PUBLISHED[name])
    for k in s:
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    return s


def allocate(name: str, base: nn.Module, s: dict, args, splits) -> dict:
    """Sensitivity analysis (held-out) and the per-layer sparsities (given or allocated)."""
    t = time.perf_counter()
    sens = sensitivity_analysis(
        base,
        splits.loader("val", 1000),
        [g for g in GRID if g <= args.max_sparsity],
        max_batches=args.sens_batches,
    )
    sens_s = time.perf_counter() - t
    write_sensitivity(
        sens, out_dir("pruning_han") / name, title=f"{name} on Fashion-MNIST: pruning sensitivity"
    )
    params0 = nonzeros(base)[0]
    weights = sum(sens.params.values())
    need = 1 - (params0 / args.target - (params0 - weights)) / weights
    drop, per = sparsities_for_budget(sens, need)
    if s["per_layer"] != "sensitivity":
        per = {k: float(v) for k, v in (item.split("=") for item in s["per_layer"].split(","))}
        drop = None
    return {
        "sensitivity": {**sens.to_dict(), "wall_s": sens_s, "max_drop": drop},
        "weight_sparsity_needed": need,
        "per_layer_sparsity": per,
        "global_sparsity": 1 - sum((1 - per[n]) * sens.params[n] for n in per) / weights,
    }


def run_seed(name: str, seed: int, s: dict, alloc: dict, splits, first: bool) -> dict:
    """Ours, torch's (and the global-ranking pair) and the dense control for one seed."""
    path = baseline(name)
    base, side = load_checkpoint(path)
    train_cfg = config_from_dict(TrainConfig, side["extra"]["train_config"])
    retrain = train_cfg.replace(epochs=s["epochs"], augment=s["augment"], seed=seed)
    val_loader, test_loader = splits.loader("val", 1000), splits.loader("test", 1000)
    kd = tuple(float(v) for v in s["distill"].split(",")) if s["distill"] else None
    s = {
        **s,
        "retrain": retrain,
        "val_loader": val_loader,
        "train_loader": splits.loader(
            "train", retrain.batch_size, seed=seed, augment=retrain.augment
        ),
        "loss_fn": distillation_loss(copy.deepcopy(base).eval(), DistillConfig(*kd))
        if kd
        else None,
    }
    per = alloc["per_layer_sparsity"]

    def ours_run(config: MagnitudeConfig) -> tuple[nn.Module, list, float]:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        its = iterative_prune(
            model,
            config,
            s["train_loader"],
            retrain,
            iterations=s["iterations"],
            lr_scale=s["lr_scale"],
            val_loader=val_loader,
            loss_fn=s["loss_fn"],
        )
        return model, its, time.perf_counter() - t

    def scores(model: nn.Module) -> dict:
        return {
            "val_accuracy": evaluate(model, val_loader)["accuracy"],
            "test_accuracy": evaluate(model, test_loader)["accuracy"],
            "nonzeros": nonzeros(model)[1],
        }

    res: dict = {"seed": seed}
    ours, its, wall = ours_run(
        MagnitudeConfig(sparsity=0.0, per_layer={n: {"sparsity": v} for n, v in per.items()})
    )
    res["ours"] = {**scores(ours), "wall_s": wall}
    res["ours"]["kept"] = {n: float(m.float().mean()) for n, m in pruning_masks(ours).items()}
    res["ours"]["iterations"] = [
        {"val_pruned": it.val_accuracy_pruned, "val_retrained": it.val_accuracy_retrained}
        for it in its
    ]
    kw = side["architecture"]["kwargs"]
    ckpt = out_dir("pruning_han") / f"{name}-s{seed}-pruned.safetensors"
    save_checkpoint(folded_copy(ours), ckpt, model_name=name, model_kwargs=kw)
    x, _ = next(iter(splits.loader("val", 256)))
    before = folded_copy(ours).eval()
    dead = remove_dead_neurons_(ours, x)
    thin = out_dir("pruning_han") / f"{name}-s{seed}-pruned-thin.safetensors"
    save_checkpoint(folded_copy(ours), thin, model_name=name, model_kwargs=kw)
    reloaded, _ = load_checkpoint(thin)
    res["ours"].update(
        checkpoint_bytes=ckpt.stat().st_size,
        checkpoint_zstd_bytes=zstd_bytes(ckpt.read_bytes()),
        dead=dead,
        thin_params=nonzeros(ours)[0],
        thin_nonzeros=nonzeros(ours)[1],
        thin_bytes=thin.stat().st_size,
        thin_zstd_bytes=zstd_bytes(thin.read_bytes()),
        # dead neurons carry no signal: the reloaded thin model gives the pruned one's outputs
        thin_outputs_equal=bool(torch.allclose(reloaded.eval()(x), before(x), atol=1e-5)),
    )

    t = time.perf_counter()
    tp = torch_prune_run(copy.deepcopy(base), per, None, s)
    res["torch"] = {**scores(tp), "wall_s": time.perf_counter() - t}
    res["torch"]["torch_save_bytes_masked"] = torch_save_bytes(tp.state_dict())
    for m in layers_of(tp).values():
        tprune.remove(m, "weight")
    buf = io.BytesIO()
    torch.save(tp.state_dict(), buf)
    res["torch"]["torch_save_bytes_removed"] = len(buf.getvalue())
    res["torch"]["torch_save_zstd_bytes_removed"] = zstd_bytes(buf.getvalue())

    if s["torch_global"] and first:  # a side comparison: on the first seed only
        g = alloc["global_sparsity"]
        og, _, wall = ours_run(MagnitudeConfig(sparsity=g, scope="global"))
        res["ours_global"] = {**scores(og), "wall_s": wall, "sparsity": g}
        res["ours_global"]["kept"] = {
            n: float(m.float().mean()) for n, m in pruning_masks(og).items()
        }
        t = time.perf_counter()
        tg = torch_prune_run(copy.deepcopy(base), per, g, s)
        res["torch_global"] = {**scores(tg), "wall_s": time.perf_counter() - t, "sparsity": g}

    phases = [
        Phase(epochs=s["epochs"], lr_scale=s["lr_scale"], distill=kd, augment=s["augment"])
    ] * s["iterations"]
    res["control"] = dense_control(name, phases, seed, splits)
    return res


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "Connection pruning (Han et al. 2015, Table 1 style) on Fashion-MNIST. Iterative "
        "magnitude pruning with the per-layer sparsities listed under the tables. Accuracies: "
        "mean ± std over the seeds (the seed changes the retraining's data order); held-out "
        "accuracy is what any choice may look at, the test split is evaluated once per row and "
        "seed. Dense control = the baseline fine-tuned with the same budget. Paper numbers are "
        "MNIST. Target (issue 3): >= 12x fewer nonzeros with <= 0.3 points lost, on the means.",
        "",
        "| model | baseline test | pruned held-out | pruned test | lost vs baseline | dense "
        "control test | lost vs control | nonzeros | fewer | target met | paper |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---|---|",
    ]
    for name, r in results.items():
        row = r["summary"]
        lines.append(
            f"| {name} | {r['baseline_test']:.2f} | {pm(row['val'])} | {pm(row['test'])} | "
            f"{row['lost_vs_baseline']:+.2f} | {pm(row['control_test'])} | "
            f"{row['lost_vs_control']:+.2f} | {r['runs'][0]['ours']['nonzeros']:,} | "
            f"{row['size'].split()[0]} | {'yes' if row['met'] else 'no'} | {PAPER_TOTAL[name]} |"
        )
    lines += ["", "Per-layer kept fraction (ours vs paper):", ""]
    for name, r in results.items():
        kept = r["runs"][0]["ours"]["kept"]
        lines.append(
            f"- **{name}**: "
            + ", ".join(
                f"{n} {100 * k:.1f}% (paper {100 * PAPER[name][n]:.0f}%)" for n, k in kept.items()
            )  # fmt: skip
        )
        if "ours_global" in r["runs"][0]:
            kept = r["runs"][0]["ours_global"]["kept"]
            lines.append(f"- {name}, global ranking: "
                         + ", ".join(f"{n} {100 * k:.1f}%" for n, k in kept.items()))  # fmt: skip
    lines += [
        "",
        "Side by side, same per-layer sparsities, same iterative schedule, retraining budget "
        "and seeds (same training loop); bytes of the first seed:",
        "",
        "| model | method | held-out acc | test acc | wall s (mean) | file | bytes | zstd bytes |",
        "|---|---|---|---|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        runs = r["runs"]
        o, t = runs[0]["ours"], runs[0]["torch"]

        def accs(key: str, runs=runs) -> str:
            rs = [x[key] for x in runs if key in x]
            va, te = [x["val_accuracy"] for x in rs], [x["test_accuracy"] for x in rs]
            wall = mean_std([x["wall_s"] for x in rs])[0]
            return f"{pm(va)} | {pm(te)} | {wall:.0f}"

        lines += [
            f"| {name} | nncompress prune_ | {accs('ours')} | safetensors (dense fp32, zeros) | "
            f"{o['checkpoint_bytes']:,} | {o['checkpoint_zstd_bytes']:,} |",
            f"| {name} | + dead-neuron removal | same | same | | safetensors, smaller layers "
            f"({o['thin_params']:,} params; outputs equal: {o['thin_outputs_equal']}) | "
            f"{o['thin_bytes']:,} | {o['thin_zstd_bytes']:,} |",
            f"| {name} | torch l1_unstructured | {accs('torch')} | torch.save (weight_orig + "
            f"weight_mask) | {t['torch_save_bytes_masked']:,} | |",
            f"| {name} | torch l1_unstructured | | | | torch.save after prune.remove (dense) | "
            f"{t['torch_save_bytes_removed']:,} | {t['torch_save_zstd_bytes_removed']:,} |",
        ]
        if "ours_global" in runs[0]:
            sp = runs[0]["ours_global"]["sparsity"]
            lines += [
                f"| {name} | nncompress prune_, global ranking (s={sp:.3f}) | "
                f"{accs('ours_global')} | | | |",
                f"| {name} | torch global_unstructured (s={sp:.3f}) | {accs('torch_global')} "
                "| | | |",
            ]
    lines += [
        "",
        "Both files are dense: torch's pruned state dict even stores every weight twice plus "
        "a float mask; ours stores the zeros (and drops dead neurons physically). Relative-index "
        "sparse storage is the Deep Compression encode stage.",
        "",
    ]
    for name, r in results.items():
        st = r["settings"]
        sens = r["alloc"]["sensitivity"]
        lines.append(
            f"- {name}: per-layer sparsity "
            f"{ {k: round(v, 3) for k, v in r['alloc']['per_layer_sparsity'].items()} } "
            + (
                f"(greedy allocation from the held-out sensitivity, predicted one-shot loss "
                f"{sens['max_drop']:.2f} points)"
                if sens["max_drop"] is not None
                else "(given)"
            )
            + f"; {st['iterations']} iterations x {st['epochs']} epochs at {st['lr_scale']:g}x "
            f"the baseline lr"
            + (f", distillation from the baseline (T,alpha = {st['distill']})"
               if st["distill"] else "")  # fmt: skip
            + ("" if st["augment"] else ", no augmentation")
            + f"; sensitivity scan {sens['wall_s']:.0f} s; dead neurons (seed "
            f"{r['runs'][0]['seed']}): "
            + (", ".join(f"{k} {v['before']}->{v.get('after')}"
                         for k, v in r["runs"][0]["ours"]["dead"]["layers"].items()) or "none")
        )  # fmt: skip
    return "\n".join(lines)


def publish(argv: list[str] | None) -> None:
    """Rewrite results/pruning_han.* from every cached (model, seed) run."""
    results, summary = {}, []
    for name in PAPER:
        f = out_dir("pruning_han") / f"{name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        runs = [
            json.loads(p.read_text())
            for p in out_dir("pruning_han").glob(f"{name}-s*.json")
            if re.fullmatch(rf"{re.escape(name)}-s\d+\.json", p.name)
        ]
        runs = sorted(
            (x for x in runs if x.get("settings") == r["settings"]), key=lambda x: x["seed"]
        )
        if not runs:
            continue
        r["runs"] = runs
        fewer = r["params"] / runs[0]["ours"]["nonzeros"]
        test = [x["ours"]["test_accuracy"] for x in runs]
        row = summary_row(
            model=name,
            method="Han pruning (iterative, retrained)",
            size=f"{fewer:.1f}x fewer nonzeros",
            test=test,
            val=[x["ours"]["val_accuracy"] for x in runs],
            baseline_test=r["baseline_test"],
            control_test=[x["control"]["test_accuracy"] for x in runs],
            target=f">= {TARGET_X:.0f}x, <= {TARGET_LOSS} points lost",
            seeds=[x["seed"] for x in runs],
        )
        row["met"] = fewer >= TARGET_X and row["lost_vs_baseline"] <= TARGET_LOSS
        r["summary"] = row
        results[name] = r
        summary.append(row)
    compute = sum(
        r["alloc"]["sensitivity"]["wall_s"]
        + sum(
            x[k]["wall_s"] for x in r["runs"] for k in ("ours", "torch", "ours_global",
                                                         "torch_global", "control") if k in x
        )
        for r in results.values()
    )  # fmt: skip
    write_result(
        "pruning_han",
        {"results": results, "summary": summary, "compute_s": compute},
        markdown(results),
        argv,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet-300-100,lenet-5")
    ap.add_argument("--target", type=float, default=12.5, help="x fewer nonzeros (allocation)")
    ap.add_argument("--iterations", type=int, help="prune -> retrain cycles (default: published)")
    ap.add_argument("--epochs", type=int, help="retraining epochs per iteration")
    ap.add_argument("--lr-scale", type=float, help="retraining lr / baseline lr (Han: 0.1)")
    ap.add_argument("--distill", metavar="T,ALPHA", help="distillation from the baseline")
    ap.add_argument(
        "--per-layer",
        metavar="NAME=S,...|sensitivity",
        help="per-layer sparsities, or 'sensitivity' for the held-out allocation",
    )
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--torch-global", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--sens-batches", type=int, help="held-out batches of 1000 for the scan")
    ap.add_argument("--max-sparsity", type=float, default=0.95, help="largest grid sparsity")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the results")
    add_protocol_args(ap)
    args = ap.parse_args(argv)
    setup(args)
    argv_full = None if argv is None else ["pruning_han.py", *argv]
    if args.report_only:
        publish(argv_full)
        return
    splits = load_splits()
    for name in args.models.split(","):
        if name not in PUBLISHED:
            raise SystemExit(f"--models: {name!r} is not one of {sorted(PUBLISHED)}")
        s = settings_of(name, args)
        if args.smoke:
            s.update(epochs=1, iterations=min(s["iterations"], 2))
        base, _ = load_checkpoint(baseline(name))
        alloc = allocate(name, base, s, args, splits)
        info = {
            "model": name,
            "settings": s,
            "seeds": args.seeds,
            "alloc": alloc,
            "params": nonzeros(base)[0],
            "baseline_val": evaluate(base, splits.loader("val", 1000))["accuracy"],
            "baseline_test": evaluate(base, splits.loader("test", 1000))["accuracy"],
        }
        blob = json.dumps(info, indent=1, default=str)
        atomic_write(out_dir("pruning_han") / f"{name}.json", lambda p, b=blob: p.write_text(b))
        for seed in args.seeds:
            f = out_dir("pruning_han") / f"{name}-s{seed}.json"
            if f.is_file() and json.loads(f.read_text()).get("settings") == s:
                continue  # resume: this seed is done with these settings
            res = run_seed(name, seed, s, alloc, splits, first=seed == args.seeds[0])
            res["settings"] = s
            blob = json.dumps(res, indent=1, default=str)
            atomic_write(f, lambda p, b=blob: p.write_text(b))
            log.info("%s seed %d: %s", name, seed, res["ours"]["test_accuracy"])
            publish(argv_full)
    publish(argv_full)


if __name__ == "__main__":
    main()
