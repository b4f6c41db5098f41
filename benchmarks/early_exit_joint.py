"""Early exits in ResNet-20 trained jointly with the backbone (BranchyNet), with its control.

The heads-only rows of early_exit.py keep the backbone frozen. Here, after the same heads-only
warm-up, heads and backbone are fine-tuned together on BranchyNet's weighted sum of the exits'
losses (Teerapittayanon et al. 2016; each early exit distilled from the final exit, T=4,
alpha=0.5); the control is the baseline fine-tuned alone with the same schedule (cross-entropy).
Thresholds are calibrated on the held-out split against the *baseline's* held-out accuracy (the
loss bound is relative to the model the user had), and the test split is evaluated once.

    ../.venv/bin/python early_exit_joint.py            # one seed, ~1 h on a loaded 2-core CPU
    ../.venv/bin/python early_exit_joint.py --smoke

Writes results/early_exit_joint.json; ``early_exit.py --parts ''`` merges it into the markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from _common import PATHS, add_results_dir_arg, setup
from early_exit import (
    AFTER,
    KD,
    _apply,
    _load,
    _macs,
    _paired_latency,
    _test,
    _train_heads,
)
from nncompress.conditional import (
    CalibrationConfig,
    ExitTrainConfig,
    calibrate_thresholds,
    collect_outputs,
    train_exits,
)
from nncompress.data import fashion_mnist
from nncompress.engine import TrainConfig, evaluate, finetune, seed_everything


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--head", default="conv-pool-linear")
    ap.add_argument("--head-epochs", type=int, default=4)
    ap.add_argument("--head-lr", type=float, default=0.05)
    ap.add_argument("--joint-epochs", type=int, default=3)
    ap.add_argument("--joint-lr", type=float, default=0.01)
    ap.add_argument("--weights", default="1,1,1", help="loss weights: exit 1, exit 2, final")
    ap.add_argument("--max-loss", type=float, default=0.5)
    ap.add_argument("--confidences", default="max-softmax,entropy")
    ap.add_argument("--latency-rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    add_results_dir_arg(ap)
    args = ap.parse_args(argv)
    setup(args)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.confidences = [c for c in args.confidences.split(",") if c]
    weights = tuple(float(w) for w in args.weights.split(","))
    torch.set_num_threads(1)
    splits = fashion_mnist()
    args.shape = splits.input_shape
    args.train_limit = args.val_limit = args.test_limit = args.latency_samples = None
    if args.smoke:
        args.train_limit, args.val_limit, args.test_limit = 256, 256, 256
        args.head_epochs, args.joint_epochs, args.latency_rounds, args.latency_samples = 1, 1, 1, 16
    t_start = time.perf_counter()
    base, source = _load("resnet-20", args.smoke)
    test_loader = splits.loader("test", 500, limit=args.test_limit)
    val_loader = splits.loader("val", 500, limit=args.val_limit)
    base_test = evaluate(base, test_loader)["accuracy"]
    base_val = evaluate(base, val_loader)["accuracy"]
    full_macs = _macs(base, args.shape)
    rows = []
    for seed in args.seeds:
        joint_cfg = TrainConfig(
            epochs=args.joint_epochs, lr=args.joint_lr, weight_decay=5e-4, augment=True, seed=seed
        )
        loader = splits.loader(
            "train", joint_cfg.batch_size, seed=seed, augment=True, limit=args.train_limit
        )
        # control: the baseline alone, same epochs, learning rate and schedule
        seed_everything(seed)
        control = copy.deepcopy(base)
        t0 = time.perf_counter()
        finetune(control, loader, joint_cfg, lr_scale=1.0)
        control_s = time.perf_counter() - t0
        control_test = evaluate(control, test_loader)["accuracy"]
        # heads-only warm-up, then joint fine-tuning (BranchyNet)
        net, info = _train_heads(copy.deepcopy(base), args.head, seed, splits, args)
        t0 = time.perf_counter()
        train_exits(net, loader, joint_cfg, ExitTrainConfig("joint", weights), kd=KD)
        joint_s = time.perf_counter() - t0
        final_test = evaluate(net.backbone, test_loader)["accuracy"]
        # the bound is relative to the baseline's held-out accuracy, not the retrained final exit
        outputs = collect_outputs(net, val_loader)
        costs = net.exit_costs(args.shape)
        cals = {
            conf: calibrate_thresholds(
                outputs,
                costs,
                CalibrationConfig(args.max_loss, "exact", conf, reference_accuracy=base_val),
                names=(*AFTER, "final"),
            )
            for conf in args.confidences
        }
        val = min(cals.values(), key=lambda r: r.expected_macs)
        _apply(net, val)
        test = _test(net, splits, args)
        lat = _paired_latency(
            {"full": base, "exits": net},
            splits.test[0][: args.latency_samples],
            args.latency_rounds,
        )
        rows.append(
            {
                "seed": seed,
                "head": args.head,
                "weights": weights,
                "joint": {**joint_cfg.__dict__, "kd": "T=4 a=0.5"},
                "heads_train_s": info["train_s"],
                "joint_train_s": joint_s,
                "control_train_s": control_s,
                "control_test_accuracy": control_test,
                "final_exit_test_accuracy": final_test,
                "val": val.to_dict(),
                "test": test.to_dict(),
                "test_loss_points": base_test - test.accuracy,
                "loss_vs_control": control_test - test.accuracy,
                "macs_ratio": test.expected_macs / full_macs,
                "latency": lat,
                "latency_speedup": lat["full"]["ms_per_sample"] / lat["exits"]["ms_per_sample"],
            }
        )
        print(
            f"joint seed {seed}: test {test.accuracy:.2f} (baseline {base_test:.2f}, control "
            f"{control_test:.2f}, final exit {final_test:.2f}), MACs "
            f"{rows[-1]['macs_ratio']:.3f}x, latency {rows[-1]['latency_speedup']:.2f}x",
            flush=True,
        )
    res = {
        "backbone": source,
        "base_test_accuracy": base_test,
        "base_val_accuracy": base_val,
        "full_macs": full_macs,
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
        "settings": {k: v for k, v in vars(args).items() if k != "shape"},
    }
    suffix = "_smoke" if args.smoke else ""
    PATHS.results.mkdir(parents=True, exist_ok=True)
    (PATHS.results / f"early_exit_joint{suffix}.json").write_text(
        json.dumps(res, indent=2, default=str)
    )


if __name__ == "__main__":
    main()
