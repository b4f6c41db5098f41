"""Han et al. 2015 Table 1 style connection pruning on the Fashion-MNIST LeNet baselines.

For each LeNet (one run, same machine, same data):

1. Sensitivity analysis on the held-out split (one layer at a time, no retraining).
2. Per-layer sparsities from the curves (greedy: smallest held-out loss per removed weight
   first) reaching the overall target (``--target`` x fewer nonzero parameters, biases included).
3. nncompress: iterative pruning (``--iterations`` prune -> retrain cycles, kept fraction
   shrinking geometrically, ``--epochs`` retraining epochs each at ``--lr-scale`` times the
   baseline's learning rate (Han: 1/10), L2 as in the baseline; ``--distill T,alpha`` retrains
   with knowledge distillation from the unpruned baseline), then dead-neuron removal. Test
   accuracy, nonzeros, per-layer kept fractions beside the paper's.
4. ``torch.nn.utils.prune`` with the same per-layer sparsities (``l1_unstructured``, same
   iterative schedule and retraining budget through the same training loop), and its
   ``global_unstructured`` at the same overall sparsity (beside ours with global ranking, same
   schedule): accuracy and ``torch.save`` bytes of the pruned state dict (``weight_orig`` +
   ``weight_mask``: dense, twice the weights) and after ``prune.remove`` (dense, zeros stored)
   versus our safetensors checkpoint (also dense fp32 with zeros, but smaller after dead-neuron
   removal); zstd-compressed sizes show what the zeros are worth to a generic compressor.
   Sparse index coding is Deep Compression's stage 3 (not here).

Per-model results are cached in out/pruning_han/MODEL.json so models can be run separately;
every run rewrites results/pruning_han.{json,md} from all cached models.

Run from benchmarks/:  ../.venv/bin/python pruning_han.py [--models lenet-300-100,lenet-5]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import sys
import time

import torch
import zstandard
from torch import nn
from torch.nn.utils import prune as tprune

from _common import ROOT, baseline, write_result
from nncompress.data import fashion_mnist
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

OUT = ROOT / "out" / "pruning_han"
log = logging.getLogger("pruning_han")

PAPER = {
    "lenet-300-100": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
    "lenet-5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
}
PAPER_TOTAL = {"lenet-300-100": "267K -> 22K (12x)", "lenet-5": "431K -> 36K (12x)"}
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98,
        0.99)  # fmt: skip


def nonzeros(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero params) of the effective model (masks applied; torch prune hooks too)."""
    params = nz = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name.endswith("_orig"):  # torch.nn.utils.prune: count the masked tensor
                t = getattr(m, name[: -len("_orig")])
            elif name == "original":  # our parametrization: original is zeroed where pruned
                t = p
            else:
                t = p
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


def torch_prune_run(
    model: nn.Module,
    per_layer: dict[str, float],
    global_sparsity: float | None,
    iterations: int,
    train_loader,
    cfg: TrainConfig,
    val_loader,
    lr_scale: float,
    loss_fn,
) -> nn.Module:
    """torch.nn.utils.prune with our iterative schedule: at iteration i each layer's kept
    fraction is (1 - s) ** (i / iterations); torch's ``amount`` is relative to the still
    unpruned weights, so it is 1 - kept_i / kept_{i-1}."""
    layers = layers_of(model)
    for i in range(1, iterations + 1):
        if global_sparsity is None:
            for n, m in layers.items():
                s = per_layer[n]
                k_prev, k_now = (1 - s) ** ((i - 1) / iterations), (1 - s) ** (i / iterations)
                tprune.l1_unstructured(m, "weight", amount=1 - k_now / k_prev)
        else:
            s = global_sparsity
            k_prev, k_now = (1 - s) ** ((i - 1) / iterations), (1 - s) ** (i / iterations)
            tprune.global_unstructured(
                [(m, "weight") for m in layers.values()],
                pruning_method=tprune.L1Unstructured,
                amount=1 - k_now / k_prev,
            )
        finetune(
            model, train_loader, cfg, lr_scale=lr_scale, val_loader=val_loader, loss_fn=loss_fn
        )
    return model


def run_model(name: str, args, splits, publish) -> dict:
    path = baseline(name)
    base, side = load_checkpoint(path)
    train_cfg = config_from_dict(TrainConfig, side["extra"]["train_config"])
    retrain = train_cfg.replace(epochs=args.epochs)
    if args.no_augment:
        retrain = retrain.replace(augment=False)
    test_loader = splits.loader("test", 1000)
    val_loader = splits.loader("val", 1000)
    train_loader = splits.loader(
        "train",
        retrain.batch_size,
        seed=retrain.seed,
        augment=retrain.augment,
        limit=args.train_limit,
    )
    acc0 = evaluate(base, test_loader)["accuracy"]
    params0, nz0 = nonzeros(base)
    log.info("%s: baseline test %.2f%%, %d params", name, acc0, params0)

    # 1-2: sensitivity and per-layer allocation
    t = time.perf_counter()
    sens = sensitivity_analysis(
        base,
        val_loader,
        [s for s in GRID if s <= args.max_sparsity],
        max_batches=args.sens_batches,
    )
    sens_s = time.perf_counter() - t
    write_sensitivity(sens, OUT / name, title=f"{name} on Fashion-MNIST: pruning sensitivity")
    weights = sum(sens.params.values())
    biases = params0 - weights
    # weight sparsity needed for params0 / target nonzeros (biases are kept)
    need = 1 - (params0 / args.target - biases) / weights
    drop, per = sparsities_for_budget(sens, need)
    if args.per_layer:  # given sparsities instead of the sensitivity allocation
        per = {k: float(v) for k, v in (item.split("=") for item in args.per_layer.split(","))}
        drop = None
    log.info(
        "%s: sensitivity %.0fs, need weight sparsity %.4f: drop %s -> %s",
        name,
        sens_s,
        need,
        drop,
        per,
    )

    # 3: nncompress iterative pruning + dead neurons
    ours = copy.deepcopy(base)
    loss_fn = None
    if args.distill:
        t_kd, a_kd = (float(v) for v in args.distill.split(","))
        loss_fn = distillation_loss(copy.deepcopy(base).eval(), DistillConfig(t_kd, a_kd))

    def our_prune(model: nn.Module, config: MagnitudeConfig) -> list:
        """Our iterative schedule with the run's retraining budget (main and global rows)."""
        return iterative_prune(
            model,
            config,
            train_loader,
            retrain,
            iterations=args.iterations,
            lr_scale=args.lr_scale,
            val_loader=val_loader,
            loss_fn=loss_fn,
        )

    t = time.perf_counter()
    its = our_prune(
        ours, MagnitudeConfig(sparsity=0.0, per_layer={n: {"sparsity": s} for n, s in per.items()})
    )
    ours_s = time.perf_counter() - t
    kept = {n: float(m.float().mean()) for n, m in pruning_masks(ours).items()}
    acc_ours = evaluate(ours, test_loader)["accuracy"]
    params1, nz1 = nonzeros(ours)
    ckpt = OUT / f"{name}-pruned.safetensors"
    kw = side["architecture"]["kwargs"]
    save_checkpoint(
        folded_copy(ours),
        ckpt,
        model_name=name,
        model_kwargs=kw,
        dataset=splits.describe(),
        metrics={"test_accuracy": acc_ours},
    )
    x, _ = next(iter(splits.loader("val", 256)))
    dead = remove_dead_neurons_(ours, x)
    acc_dead = evaluate(ours, test_loader)["accuracy"]
    params2, nz2 = nonzeros(ours)
    ckpt_dead = OUT / f"{name}-pruned-thin.safetensors"
    save_checkpoint(
        folded_copy(ours),
        ckpt_dead,
        model_name=name,
        model_kwargs=kw,
        dataset=splits.describe(),
        metrics={"test_accuracy": acc_dead},
    )
    reloaded, _ = load_checkpoint(ckpt_dead)
    acc_reload = evaluate(reloaded, test_loader)["accuracy"]

    res = {
        "model": name,
        "command": "python pruning_han.py " + " ".join(sys.argv[1:]),
        "baseline_test_accuracy": acc0,
        "params": params0,
        "sensitivity": {**sens.to_dict(), "wall_s": sens_s, "max_drop": drop},
        "target_x": args.target,
        "weight_sparsity_needed": need,
        "per_layer_sparsity": per,
        "iterations": args.iterations,
        "retrain_epochs_per_iteration": args.epochs,
        "retrain_lr": retrain.lr * args.lr_scale,
        "distill": args.distill,
        "train_limit": args.train_limit,
        "augment": retrain.augment,
        "ours": {
            "test_accuracy": acc_ours,
            "nonzeros": nz1,
            "compression_x": params0 / nz1,
            "kept": kept,
            "wall_s": ours_s,
            "iterations": [
                {
                    "val_pruned": it.val_accuracy_pruned,
                    "val_retrained": it.val_accuracy_retrained,
                    "kept": {n: r.kept_fraction for n, r in it.layers.items()},
                }
                for it in its
            ],
            "checkpoint_bytes": ckpt.stat().st_size,
            "checkpoint_zstd_bytes": zstd_bytes(ckpt.read_bytes()),
            "dead": dead,
            "after_dead": {
                "test_accuracy": acc_dead,
                "params": params2,
                "nonzeros": nz2,
                "checkpoint_bytes": ckpt_dead.stat().st_size,
                "checkpoint_zstd_bytes": zstd_bytes(ckpt_dead.read_bytes()),
                "reloaded_test_accuracy": acc_reload,
            },
        },
        "torch_prune": None,
        "torch_global": None,
    }
    publish(res)

    # 4: torch.nn.utils.prune, same sparsities and budget
    tp = copy.deepcopy(base)
    t = time.perf_counter()
    torch_prune_run(
        tp, per, None, args.iterations, train_loader, retrain, val_loader, args.lr_scale, loss_fn
    )
    tp_s = time.perf_counter() - t
    acc_tp = evaluate(tp, test_loader)["accuracy"]
    _, nz_tp = nonzeros(tp)
    tp_bytes_masked = torch_save_bytes(tp.state_dict())
    tp_removed = copy.deepcopy(tp)
    for m in layers_of(tp_removed).values():
        tprune.remove(m, "weight")
    tp_bytes_removed = torch_save_bytes(tp_removed.state_dict())
    buf = io.BytesIO()
    torch.save(tp_removed.state_dict(), buf)
    tp_zstd = zstd_bytes(buf.getvalue())

    res["torch_prune"] = {
        "test_accuracy": acc_tp,
        "nonzeros": nz_tp,
        "wall_s": tp_s,
        "torch_save_bytes_masked": tp_bytes_masked,
        "torch_save_bytes_removed": tp_bytes_removed,
        "torch_save_zstd_bytes_removed": tp_zstd,
    }
    publish(res)
    if args.torch_global:
        tg_model = copy.deepcopy(base)
        s_all = 1 - sum((1 - per[n]) * sens.params[n] for n in per) / weights
        t = time.perf_counter()
        torch_prune_run(
            tg_model,
            per,
            s_all,
            args.iterations,
            train_loader,
            retrain,
            val_loader,
            args.lr_scale,
            loss_fn,
        )
        ours_global = copy.deepcopy(base)
        t = time.perf_counter()
        our_prune(ours_global, MagnitudeConfig(sparsity=s_all, scope="global"))
        res["ours_global"] = {
            "sparsity": s_all,
            "test_accuracy": evaluate(ours_global, test_loader)["accuracy"],
            "nonzeros": nonzeros(ours_global)[1],
            "wall_s": time.perf_counter() - t,
            "kept": {n: float(m.float().mean()) for n, m in pruning_masks(ours_global).items()},
        }
        res["torch_global"] = {
            "sparsity": s_all,
            "test_accuracy": evaluate(tg_model, test_loader)["accuracy"],
            "nonzeros": nonzeros(tg_model)[1],
            "wall_s": time.perf_counter() - t,
            "kept": {
                n: float((m.weight != 0).float().mean()) for n, m in layers_of(tg_model).items()
            },
        }
        publish(res)
    return res


def dead_summary(dead: dict) -> str:
    parts = [f"{k} {v['before']}->{v.get('after')}" for k, v in dead["layers"].items()]
    return ", ".join(parts) if parts else "none"


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "# Connection pruning (Han et al. 2015, Table 1 style) on Fashion-MNIST",
        "",
        "Iterative magnitude pruning with per-layer sparsities derived from a sensitivity "
        "analysis on the held-out split, or given (`--per-layer`, e.g. the paper's): each "
        "model's settings are listed under the tables. Models may come from separate runs "
        "(results cached per model); accuracy on the 10k test split. Paper numbers are MNIST.",
        "",
        "| model | baseline acc | pruned acc | Δ (points) | params | nonzeros | fewer | paper |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        o = r["ours"]
        lines.append(
            f"| {name} | {r['baseline_test_accuracy']:.2f}% | {o['test_accuracy']:.2f}% | "
            f"{o['test_accuracy'] - r['baseline_test_accuracy']:+.2f} | {r['params']:,} | "
            f"{o['nonzeros']:,} | {o['compression_x']:.1f}x | {PAPER_TOTAL[name]} |"
        )
    lines += ["", "Per-layer kept fraction (ours vs paper):", ""]
    for name, r in results.items():
        lines.append(
            f"- **{name}**: "
            + ", ".join(
                f"{n} {100 * k:.1f}% (paper {100 * PAPER[name].get(n, float('nan')):.0f}%)"
                for n, k in r["ours"]["kept"].items()
            )
        )
        if r.get("ours_global"):
            kept = r["ours_global"]["kept"]
            lines.append(
                f"- {name}, global ranking: "
                + ", ".join(f"{n} {100 * k:.1f}%" for n, k in kept.items())
            )
    lines += [
        "",
        "Side by side, same per-layer sparsities, same iterative schedule and retraining "
        "budget (same training loop):",
        "",
        "| model | method | test acc | nonzeros | file | bytes | zstd bytes |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        o, t = r["ours"], r["torch_prune"]
        d = o["after_dead"]
        lines += [
            f"| {name} | nncompress prune_ | {o['test_accuracy']:.2f}% | {o['nonzeros']:,} | "
            f"safetensors (dense fp32, zeros) | {o['checkpoint_bytes']:,} | "
            f"{o['checkpoint_zstd_bytes']:,} |",
            f"| {name} | + dead-neuron removal | {d['test_accuracy']:.2f}% | {d['nonzeros']:,} | "
            f"safetensors, smaller layers ({d['params']:,} params) | {d['checkpoint_bytes']:,} | "
            f"{d['checkpoint_zstd_bytes']:,} |",
        ]
        if t is None:
            lines.append(f"| {name} | torch l1_unstructured | not run | | | | |")
        else:
            lines += [
                f"| {name} | torch l1_unstructured | {t['test_accuracy']:.2f}% | {t['nonzeros']:,} | "
                f"torch.save state dict (weight_orig + weight_mask) | "
                f"{t['torch_save_bytes_masked']:,} | |",
                f"| {name} | torch l1_unstructured | | | torch.save after prune.remove (dense) | "
                f"{t['torch_save_bytes_removed']:,} | {t['torch_save_zstd_bytes_removed']:,} |",
            ]
        if r.get("ours_global"):
            g = r["ours_global"]
            lines.append(
                f"| {name} | nncompress prune_, global ranking (s={g['sparsity']:.3f}) | "
                f"{g['test_accuracy']:.2f}% | {g['nonzeros']:,} | | | |"
            )
        if r.get("torch_global"):
            g = r["torch_global"]
            lines.append(
                f"| {name} | torch global_unstructured (s={g['sparsity']:.3f}) | "
                f"{g['test_accuracy']:.2f}% | {g['nonzeros']:,} | | | |"
            )
    lines += [
        "",
        "Both files are dense: torch's pruned state dict even stores every weight twice plus "
        "a float mask; ours stores the zeros (and drops dead neurons physically). Relative-index "
        "sparse storage is the Deep Compression encode stage.",
        "",
    ]
    for name, r in results.items():
        lines.append(
            f"- {name}: sensitivity {r['sensitivity']['wall_s']:.0f} s, "
            + (
                f"greedy allocation (predicted one-shot loss {r['sensitivity']['max_drop']:.2f} "
                "points)"
                if r["sensitivity"]["max_drop"] is not None
                else "per-layer sparsities given on the command line"
            )
            + " -> per-layer sparsity "
            f"{ {k: round(v, 3) for k, v in r['per_layer_sparsity'].items()} }; "
            f"{r['iterations']} iterations x {r['retrain_epochs_per_iteration']} epochs at lr "
            f"{r['retrain_lr']:g}"
            + (
                f" with distillation from the baseline (T, alpha = {r['distill']})"
                if r.get("distill")
                else ""
            )
            + ("" if r.get("augment", True) else ", without augmentation")
            + (f" (`{r['command']}`)" if r.get("command") else "")
            + (
                f" on the first {r['train_limit']:,} training images"
                if r.get("train_limit")
                else ""
            )
            + f"; ours {r['ours']['wall_s']:.0f} s, torch "
            f"{(r['torch_prune'] or {}).get('wall_s', float('nan')):.0f} s; dead neurons "
            f"{dead_summary(r['ours']['dead'])}; "
            f"reloaded thin checkpoint {r['ours']['after_dead']['reloaded_test_accuracy']:.2f}%"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet-300-100,lenet-5")
    ap.add_argument("--target", type=float, default=12.5, help="x fewer nonzero params")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4, help="retraining epochs per iteration")
    ap.add_argument(
        "--lr-scale", type=float, default=0.1, help="retraining lr / baseline lr (Han: 0.1)"
    )
    ap.add_argument(
        "--distill",
        metavar="T,ALPHA",
        help="retrain with knowledge distillation from the baseline (both ours and torch's)",
    )
    ap.add_argument(
        "--per-layer",
        metavar="NAME=S,...",
        help="per-layer sparsities instead of the sensitivity allocation (e.g. the paper's)",
    )
    ap.add_argument(
        "--no-augment", action="store_true", help="retrain without the baseline's augmentation"
    )
    ap.add_argument("--no-torch-global", dest="torch_global", action="store_false")
    ap.add_argument(
        "--train-limit",
        type=int,
        help="retrain on the first N training images only (time box on a loaded machine)",
    )
    ap.add_argument(
        "--sens-batches", type=int, help="held-out batches of 1000 for the sensitivity analysis"
    )
    ap.add_argument(
        "--max-sparsity",
        type=float,
        default=0.95,
        help="largest per-layer sparsity of the sensitivity grid (caps the allocation)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite results/pruning_han.* from the cached per-model results, run nothing",
    )
    args = ap.parse_args()
    if args.report_only:
        models = [n for n in PAPER if (OUT / f"{n}.json").is_file()]
        if models:
            publish(json.loads((OUT / f"{models[0]}.json").read_text()))
        return
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    splits = fashion_mnist()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        res = run_model(name, args, splits, publish)
        log.info("%s done: %s", name, res["ours"]["test_accuracy"])


def publish(res: dict) -> None:
    """Cache one model's (partial) results and rewrite results/pruning_han.* from all models."""
    blob = json.dumps(res, indent=2, default=str)
    atomic_write(OUT / f"{res['model']}.json", lambda p, b=blob: p.write_text(b))
    results = {}
    for n in PAPER:
        f = OUT / f"{n}.json"
        if f.is_file():
            results[n] = json.loads(f.read_text())
    write_result("pruning_han", {"results": results}, markdown(results))


if __name__ == "__main__":
    main()
