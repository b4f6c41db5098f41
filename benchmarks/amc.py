"""Automated compression policy (AMC, He et al. 2018) on the Fashion-MNIST baselines.

Parts (``--parts resnet,lenet,scaling``; each writes results/amc_<part>.json, every run merges
what exists into results/amc.{json,md}):

- ``resnet``: ResNet-20 filter pruning to at most 50% of the MACs. Four policies in the same
  action space (every coupled channel group one unit, L1 filters, at least 20% of a group's
  prunable channels kept): uniform (one keep fraction, the largest meeting the budget),
  sensitivity-greedy, random search and DDPG; the searches score candidates on a fixed
  held-out subset after the least-squares refit of the next layers (no fine-tuning). Each
  policy is then applied with ``prune_filters_`` and fine-tuned with the same budget
  (``--epochs``, ``--lr``, augmentation, best held-out epoch kept) for ``--seeds`` seeds; the
  dense baseline gets the same extra training as a control. Test accuracy once per row.
  Target: DDPG >= uniform + 0.3 points and >= the best other policy (means over seeds).
- ``lenet``: LeNet-300-100 connection pruning, the budget set to the number of weights the
  paper's hand-set 8/9/26% keeps; the searched policies vs the hand-set one, one-shot pruning
  plus the same retraining.
- ``scaling``: the same random search with 1 and 2 Ray workers (episodes per minute) and, if
  Ray allows it on one machine, on a two-node local Ray cluster joined by address.

Run from benchmarks/ (long: use /work/bin/heavy; ``scaling`` runs 2 workers, so give it both
slots)::

    ../.venv/bin/python amc.py --parts lenet
    ../.venv/bin/python amc.py --parts resnet --seeds 3 --epochs 2
    ../.venv/bin/python amc.py --smoke          # seconds: digits, tiny nets, a few episodes
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _common import PATHS, add_results_dir_arg, baseline, out_dir, setup, write_result
from nncompress.data import digits, fashion_mnist
from nncompress.engine import TrainConfig, atomic_write, evaluate, finetune, fit, load_checkpoint
from nncompress.models import create
from nncompress.models.resnet import CifarResNet
from nncompress.policy import (
    ActionsConfig,
    ActionSpace,
    DDPGConfig,
    Policy,
    ProxyConfig,
    RayExecutor,
    SearchConfig,
)
from nncompress.prune import prune_, prune_filters_
from nncompress.stages.search_model import build_space, search_model
from nncompress.stats import count_macs

OUT = Path(__file__).resolve().parent / "out" / "amc"
log = logging.getLogger("amc")
PAPER_LENET = {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}  # Han et al. 2015, Table 2 (kept)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def macs_of(model: nn.Module, shape) -> int:
    return sum(v[0] for v in count_macs(model, shape).values())


def uniform_q(space: ActionSpace) -> np.ndarray:
    """One keep fraction for every unit: the largest that meets the budgets (bisection)."""
    lo, hi = 0.0, 1.0
    best = space.min_q()
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        q = np.array([u.q_of(mid) for u in space.units], dtype=np.int64)
        if space.feasible(q):
            lo, best = mid, q
        else:
            hi = mid
    return best


def apply_policy(model: nn.Module, policy: Policy, x: torch.Tensor) -> nn.Module:
    m = copy.deepcopy(model)
    if policy.filter:
        prune_filters_(m, policy, x)
    if policy.sparsity:
        prune_(m, policy)
    return m


def retrain(model, splits, cfg: TrainConfig, seed: int, lr_scale: float, limit=None) -> dict:
    """Fine-tune (the best held-out epoch is kept), then test once."""
    m = copy.deepcopy(model)
    train = splits.loader("train", cfg.batch_size, seed=seed, augment=cfg.augment, limit=limit)
    val = splits.loader("val", 500)
    t0 = time.perf_counter()
    hist = finetune(
        m, train, cfg.replace(seed=seed, restore_best=True), lr_scale=lr_scale, val_loader=val
    )
    test = evaluate(m, splits.loader("test", 500))["accuracy"]
    return {
        "seed": seed,
        "test_accuracy": test,
        "val_accuracy": max(
            [hist.start_val_accuracy or 0.0] + [e.get("val_accuracy", 0.0) for e in hist.epochs]
        ),
        "best_epoch": hist.best_epoch,
        "wall_s": time.perf_counter() - t0,
    }


def run_searches(model, splits, x, base_cfg: SearchConfig, agents, out: Path) -> dict:
    """Each agent's search (resumable in out/<agent>); returns rows keyed by agent."""
    rows = {}
    for agent, episodes in agents:
        cfg = base_cfg.replace(agent=agent, episodes=episodes)
        t0 = time.perf_counter()
        res = search_model(
            model, splits.train, splits.val, cfg, example_input=x, out_dir=out / agent
        )
        wall = time.perf_counter() - t0
        evals = sum(e["eval_s"] for e in res.episodes if e["episode"] >= res.resumed_episodes)
        rows[agent] = {
            "policy": res.policy.to_dict(),
            "proxy_accuracy": res.best["accuracy"],
            "baseline_proxy_accuracy": res.baseline_accuracy,
            "fractions": res.best["fractions"],
            "episodes": len(res.episodes),
            "best_episode": res.best["episode"],
            "search_wall_s": wall,
            "resumed_episodes": res.resumed_episodes,
            "eval_s_this_run": evals,
            "rewards": res.rewards,
        }
        log.info(
            "%s: proxy %.2f%% (baseline %.2f%%), %s, %.0f s",
            agent,
            res.best["accuracy"],
            res.baseline_accuracy,
            res.best["fractions"],
            wall,
        )
    return rows


def policy_rows(model, splits, x, shape, space, searched, uniform_policy, cfg, args, seeds):
    """Fine-tune every policy (and the dense control) for each seed."""
    dense_macs = macs_of(model, shape)
    rows = []
    candidates = [("uniform", uniform_policy, None)] + [
        (a, Policy.from_dict(r["policy"]), r) for a, r in searched.items()
    ]
    for name, pol, srow in candidates:
        m = apply_policy(model, pol, x)
        runs = [retrain(m, splits, cfg, s, args.lr_scale, args.train_limit) for s in seeds]
        te = mean_std([r["test_accuracy"] for r in runs])
        va = mean_std([r["val_accuracy"] for r in runs])
        rows.append(
            {
                "policy": name,
                "macs_kept": macs_of(m, shape) / dense_macs,
                "params": sum(p.numel() for p in m.parameters()),
                "proxy_accuracy": srow["proxy_accuracy"] if srow else None,
                "search_wall_s": srow["search_wall_s"] if srow else 0.0,
                "episodes": srow["episodes"] if srow else 0,
                "test_mean": te[0],
                "test_std": te[1],
                "val_mean": va[0],
                "val_std": va[1],
                "runs": runs,
                "ratios": pol.filter or pol.sparsity,
            }
        )
        log.info("%s: test %.2f +- %.2f (%d seeds)", name, te[0], te[1], len(runs))
    return rows


def resnet_part(args) -> dict:
    if args.smoke:
        splits = digits()
        torch.manual_seed(0)
        model = CifarResNet(depth=8, width=8)
        fit(model, splits.loader("train", 64), TrainConfig(epochs=2, lr=0.05))
    else:
        splits = fashion_mnist(args.data_dir)
        model, _ = load_checkpoint(baseline("resnet-20"))
    model = model.eval()
    shape = splits.input_shape
    x = splits.val[0][:2]
    budget = f"macs={args.macs}"
    actions = ActionsConfig(min_keep=0.2)
    proxy = ProxyConfig(val_samples=args.val_samples, calib_samples=args.calib_samples, seed=0)
    ddpg = DDPGConfig(warmup=args.warmup)
    base_cfg = SearchConfig(
        budgets=budget, actions=actions, proxy=proxy, ddpg=ddpg, seed=0, episodes_per_round=2
    )
    space = build_space(model, x, actions, base_cfg.budgets)
    uq = uniform_q(space)
    uniform_policy = space.policy(uq, {"agent": "uniform", "fractions": space.fractions(uq)})
    out = OUT / ("smoke-resnet" if args.smoke else "resnet20")
    searched = run_searches(
        model,
        splits,
        x,
        base_cfg,
        [("greedy", 1), ("random", args.episodes), ("ddpg", args.episodes)],
        out,
    )
    base_test = evaluate(model, splits.loader("test", 500))["accuracy"]
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=5e-4, augment=True)
    seeds = list(range(args.seeds))
    rows = policy_rows(model, splits, x, shape, space, searched, uniform_policy, cfg, args, seeds)
    control = [
        retrain(model, splits, cfg, s, args.lr_scale, args.train_limit)
        for s in seeds[: args.control_seeds]
    ]
    c = mean_std([r["test_accuracy"] for r in control])
    by = {r["policy"]: r for r in rows}
    others = max(by[k]["test_mean"] for k in ("uniform", "greedy", "random"))
    return {
        "model": "tiny-resnet (digits, smoke)" if args.smoke else "resnet-20",
        "budget": budget,
        "baseline_test_accuracy": base_test,
        "units": [u.to_dict() for u in space.units],
        "uniform_keep": [int(v) for v in uq],
        "rows": rows,
        "dense_control": {"test_mean": c[0], "test_std": c[1], "runs": control},
        "settings": {
            "epochs": args.epochs,
            "lr": args.lr,
            "lr_scale": args.lr_scale,
            "seeds": seeds,
            "control_seeds": args.control_seeds,
            "episodes": args.episodes,
            "warmup": args.warmup,
            "val_samples": args.val_samples,
            "calib_samples": args.calib_samples,
            "train_limit": args.train_limit,
        },
        "targets": {
            "ddpg_minus_uniform": by["ddpg"]["test_mean"] - by["uniform"]["test_mean"],
            "ddpg_minus_best_other": by["ddpg"]["test_mean"] - others,
            "met_uniform_plus_0.3": by["ddpg"]["test_mean"] >= by["uniform"]["test_mean"] + 0.3,
            "met_best_other": by["ddpg"]["test_mean"] >= others,
        },
    }


def lenet_part(args) -> dict:
    if args.smoke:
        splits = digits()
        torch.manual_seed(0)
        model = create("lenet-300-100", in_features=64)
        fit(model, splits.loader("train", 64), TrainConfig(epochs=3, lr=0.05))
    else:
        splits = fashion_mnist(args.data_dir)
        model, _ = load_checkpoint(baseline("lenet-300-100"))
    model = model.eval()
    x = splits.val[0][:2]
    actions = ActionsConfig(filter=False, sparsity=True, min_density=0.01)
    probe = build_space(model, x, actions)
    hand_q = np.array([round(PAPER_LENET[u.name] * u.full) for u in probe.units], dtype=np.int64)
    frac = probe.fractions(hand_q)["params"]
    budget = f"params={frac:.6f}"
    space = probe.with_budgets(SearchConfig(budgets=budget).budgets)
    if not space.feasible(hand_q):  # the printed fraction rounds down: allow the hand-set one
        budget = f"params={frac + 1e-6:.6f}"
        space = probe.with_budgets(SearchConfig(budgets=budget).budgets)
    hand = space.policy(hand_q, {"agent": "paper (Han et al. 8/9/26%)"})
    proxy = ProxyConfig(val_samples=args.val_samples, refit=False)
    base_cfg = SearchConfig(
        budgets=budget,
        actions=actions,
        proxy=proxy,
        ddpg=DDPGConfig(warmup=args.lenet_warmup),
        episodes_per_round=2,
    )
    out = OUT / ("smoke-lenet" if args.smoke else "lenet300")
    searched = run_searches(
        model,
        splits,
        x,
        base_cfg,
        [("greedy", 1), ("random", args.lenet_episodes), ("ddpg", args.lenet_episodes)],
        out,
    )
    cfg = TrainConfig(epochs=args.lenet_epochs, lr=0.05, weight_decay=1e-4)
    seeds = list(range(args.seeds))
    rows = []
    for name, pol in [("paper 8/9/26%", hand)] + [
        (a, Policy.from_dict(r["policy"])) for a, r in searched.items()
    ]:
        m = apply_policy(model, pol, x)
        nnz = sum(int((mm.weight != 0).sum()) for mm in m.modules() if isinstance(mm, nn.Linear))
        before = evaluate(m, splits.loader("val", 500))["accuracy"]
        runs = [retrain(m, splits, cfg, s, 0.1) for s in seeds]
        te = mean_std([r["test_accuracy"] for r in runs])
        rows.append(
            {
                "policy": name,
                "kept": {k: 1 - v for k, v in pol.sparsity.items()},
                "weights_kept": nnz,
                "val_before_retrain": before,
                "search_wall_s": searched.get(name, {}).get("search_wall_s", 0.0),
                "test_mean": te[0],
                "test_std": te[1],
                "runs": runs,
            }
        )
        log.info("lenet %s: %s test %.2f +- %.2f", name, rows[-1]["kept"], te[0], te[1])
    return {
        "model": "lenet-300-100" + (" (digits, smoke)" if args.smoke else ""),
        "budget": budget,
        "baseline_test_accuracy": evaluate(model, splits.loader("test", 500))["accuracy"],
        "rows": rows,
        "settings": {
            "epochs": args.lenet_epochs,
            "lr": 0.005,
            "seeds": seeds,
            "episodes": args.lenet_episodes,
            "warmup": args.lenet_warmup,
            "val_samples": args.val_samples,
        },
    }


def scaling_part(args) -> dict:
    import ray

    if args.smoke:
        splits = digits()
        torch.manual_seed(0)
        model = CifarResNet(depth=8, width=8)
        name = "tiny-resnet (digits, smoke)"
    else:
        splits = fashion_mnist(args.data_dir)
        model, _ = load_checkpoint(baseline("resnet-20"))
        name = "resnet-20"
    model = model.eval()
    x = splits.val[0][:2]
    cfg = SearchConfig(
        budgets=f"macs={args.macs}",
        agent="random",
        episodes=args.scaling_episodes,
        episodes_per_round=2,
        proxy=ProxyConfig(val_samples=args.val_samples, calib_samples=args.calib_samples),
    )
    rows = []
    ref: list = []

    def timed(label: str, ex: RayExecutor) -> None:
        t0 = time.perf_counter()
        res = search_model(model, splits.train, splits.val, cfg, example_input=x, executor=ex)
        wall = time.perf_counter() - t0
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        cpus = ray.cluster_resources().get("CPU", 0)
        ex.close()
        # the first round also starts the worker processes: rate over the rounds after it
        firsts = res.episodes[cfg.episodes_per_round :: cfg.episodes_per_round]
        loop = sum(e["round_s"] for e in firsts)
        n = len(res.episodes) - cfg.episodes_per_round
        q = [e["q"] for e in res.episodes]
        if not ref:
            ref.extend(q)
        rows.append(
            {
                "setup": label,
                "workers": ex.workers,
                "nodes": nodes,
                "cpus": cpus,
                "episodes": len(res.episodes),
                "wall_s": wall,
                "loop_s": loop,
                "episodes_per_min": 60 * n / loop,
                "same_episodes_as_1_worker": q == ref,
            }
        )
        log.info("%s: %.1f episodes/min", label, rows[-1]["episodes_per_min"])

    # smoke: one local row (each Ray start and its workers' imports cost tens of seconds on a
    # loaded machine, where Ray's workers run at nice 15); the address path below still runs
    local = (
        (("local Ray, 1 worker", 1),)
        if args.smoke
        else (("local Ray, 1 worker", 1), ("local Ray, 2 workers", 2))
    )
    for label, workers in local:
        timed(label, RayExecutor(workers=workers))
    cluster_note = ""
    try:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        try:
            timed(
                "2-node local Ray cluster joined by address (ray_address=HOST:PORT)",
                RayExecutor(address=cluster.address, workers=2),
            )
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
    except Exception as exc:  # noqa: BLE001 - report what Ray said, the other rows stand
        cluster_note = f"two-node local cluster not run: {type(exc).__name__}: {exc}"
        log.warning(cluster_note)
    return {
        "model": name,
        "budget": f"macs={args.macs}",
        "rows": rows,
        "cluster_note": cluster_note,
        "episodes_per_round": cfg.episodes_per_round,
    }


# ---------------------------------------------------------------------------------------------


def _fmt(m: float, s: float) -> str:
    return f"{m:.2f} ± {s:.2f}"


def markdown(parts: dict) -> str:
    md = ["# Automated compression policy (AMC, He et al. 2018)", ""]
    r = parts.get("resnet")
    if r:
        st = r["settings"]
        md += [
            f"## {r['model']}: filter pruning to {r['budget']} (test accuracy, "
            f"{len(st['seeds'])} fine-tuning seeds)",
            "",
            f"Baseline test accuracy {r['baseline_test_accuracy']:.2f}%. Every policy in the "
            f"same action space ({len(r['units'])} units = coupled channel groups, L1 filters, "
            "at least 20% of a group's prunable channels kept); searches scored on "
            f"{st['val_samples']} held-out images after the least-squares refit of the next "
            f"layers ({st['calib_samples']} training images), no fine-tuning. Fine-tuning: "
            f"{st['epochs']} epochs, lr {st['lr']}×{st['lr_scale']} cosine, augmentation, best "
            "held-out epoch kept, no distillation (the same for every row).",
            "",
            "| policy | MACs kept | params | proxy acc (val subset) | search wall (s) | episodes"
            " | test acc after FT (%) | val acc after FT (%) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in r["rows"]:
            proxy = f"{row['proxy_accuracy']:.2f}" if row["proxy_accuracy"] is not None else "-"
            md.append(
                f"| {row['policy']} | {100 * row['macs_kept']:.1f}% | {row['params']:,} | "
                f"{proxy} | {row['search_wall_s']:.0f} | {row['episodes']} | "
                f"{_fmt(row['test_mean'], row['test_std'])} | "
                f"{_fmt(row['val_mean'], row['val_std'])} |"
            )
        dc = r["dense_control"]
        md.append(
            f"| dense + same training (control, {len(dc['runs'])} seed(s)) | 100% | - | - "
            f"| - | - | {_fmt(dc['test_mean'], dc['test_std'])} | - |"
        )
        t = r["targets"]
        md += [
            "",
            f"Target DDPG ≥ uniform + 0.3: {'met' if t['met_uniform_plus_0.3'] else 'MISSED'}"
            f" (DDPG − uniform = {t['ddpg_minus_uniform']:+.2f} points); DDPG ≥ best other: "
            f"{'met' if t['met_best_other'] else 'MISSED'} "
            f"({t['ddpg_minus_best_other']:+.2f} points).",
            "",
        ]
        md.append("Fraction of each unit's prunable channels removed (unit = its first layer):")
        md.append("")
        names = [u["name"] for u in r["units"]]
        for row in r["rows"]:
            md.append(
                f"- {row['policy']}: "
                + ", ".join(f"{k}={row['ratios'][k]:.2f}" for k in names if k in row["ratios"])
            )
        md.append("")
    lt = parts.get("lenet")
    if lt:
        st = lt["settings"]
        md += [
            f"## {lt['model']}: connection pruning at the paper's weight count ({lt['budget']})",
            "",
            f"Baseline test accuracy {lt['baseline_test_accuracy']:.2f}%. One-shot magnitude "
            f"pruning with each policy's per-layer sparsities, then {st['epochs']} epochs of "
            f"retraining at lr {st['lr']} ({len(st['seeds'])} seeds, best held-out epoch kept);"
            f" searches scored on {st['val_samples']} held-out images (no retraining).",
            "",
            "| policy | kept fc1 / fc2 / fc3 | weights kept | val acc before retrain | "
            "search wall (s) | test acc after retrain (%) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in lt["rows"]:
            kept = " / ".join(
                f"{100 * row['kept'][k]:.1f}%" for k in ("fc1", "fc2", "fc3") if k in row["kept"]
            )
            md.append(
                f"| {row['policy']} | {kept} | {row['weights_kept']:,} | "
                f"{row['val_before_retrain']:.2f} | {row['search_wall_s']:.0f} | "
                f"{_fmt(row['test_mean'], row['test_std'])} |"
            )
        md.append("")
    sc = parts.get("scaling")
    if sc:
        md += [
            f"## Ray scaling ({sc['model']}, random search, {sc['budget']})",
            "",
            "Episodes per minute over the rounds after the first (the first also starts "
            f"the worker processes), {sc['episodes_per_round']} candidates per round.",
            "",
            "| setup | nodes | CPUs | workers | episodes | timed loop (s) | episodes / min |"
            " same episodes as 1 worker |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in sc["rows"]:
            md.append(
                f"| {row['setup']} | {row['nodes']} | {row['cpus']:g} | {row['workers']} "
                f"| {row['episodes']} | {row['loop_s']:.1f} | "
                f"{row['episodes_per_min']:.1f} | {row['same_episodes_as_1_worker']} |"
            )
        if sc.get("cluster_note"):
            md += ["", sc["cluster_note"]]
        md += [
            "",
            "On a cluster: start Ray on the head node (`ray start --head --port 6379`) and on "
            "each worker node (`ray start --address HEAD:6379`), with the same nncompress and "
            "torch installed everywhere; then `nncompress search CKPT --target macs=0.5 "
            "--executor ray --ray-address HEAD:6379 --per-round N` (or `executor: ray, "
            "ray_address: ...` in a recipe's `search` stage). The model and the held-out subset "
            "go into the object store once; every candidate is one task of one CPU with one "
            "torch thread, so a round of N candidates keeps N CPUs busy. DDPG learns between "
            "rounds: rounds larger than a few candidates give the agent staler updates than "
            "AMC's one-episode-at-a-time loop (the greedy scan and random search have no such "
            "limit). The two-node row above is two Ray nodes on this one machine joined by "
            "address, the same code path as a real cluster; its speed says nothing about a "
            "network.",
            "",
        ]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="resnet,lenet,scaling")
    ap.add_argument("--smoke", action="store_true", help="digits, tiny nets, seconds")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--macs", type=float, default=0.5)
    ap.add_argument("--episodes", type=int, default=160, help="DDPG / random episodes (ResNet)")
    ap.add_argument("--warmup", type=int, default=60, help="DDPG warm-up episodes (ResNet)")
    ap.add_argument("--val-samples", type=int, default=1000)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (ResNet)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--lr-scale", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--control-seeds", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--lenet-episodes", type=int, default=120)
    ap.add_argument("--lenet-warmup", type=int, default=40)
    ap.add_argument("--lenet-epochs", type=int, default=8)
    ap.add_argument("--scaling-episodes", type=int, default=16)
    add_results_dir_arg(ap)
    args = ap.parse_args(argv)
    setup(args)
    global OUT
    OUT = out_dir("amc")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.smoke:
        args.episodes, args.warmup, args.val_samples, args.calib_samples = 6, 3, 100, 32
        args.epochs, args.seeds, args.lenet_episodes, args.lenet_warmup = 1, 2, 6, 3
        args.lenet_epochs, args.scaling_episodes, args.train_limit = 1, 4, 256
    parts = [p for p in args.parts.split(",") if p]
    fns = {"resnet": resnet_part, "lenet": lenet_part, "scaling": scaling_part}
    for p in parts:
        if p not in fns:
            raise SystemExit(f"--parts: {p!r} is not one of {sorted(fns)}")
    tag = "amc_smoke" if args.smoke else "amc"
    for p in parts:
        t0 = time.perf_counter()
        res = fns[p](args)
        res["wall_s"] = time.perf_counter() - t0
        path = PATHS.results / f"{tag}_{p}.json"
        PATHS.results.mkdir(parents=True, exist_ok=True)
        blob = json.dumps(res, indent=2, sort_keys=True, default=str)
        atomic_write(path, lambda tmp, b=blob: tmp.write_text(b))
    merged = {}
    for p in fns:
        path = PATHS.results / f"{tag}_{p}.json"
        if path.is_file():
            merged[p] = json.loads(path.read_text())
    write_result(
        tag, {"parts": merged}, markdown(merged), None if argv is None else ["amc.py", *argv]
    )


if __name__ == "__main__":
    main()
