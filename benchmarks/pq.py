"""Product quantization (Stock et al. 2020, "And the Bit Goes Down") on Fashion-MNIST.

For ResNet-20 (the foundation baseline): PQ with the activation objective in the "small
blocks" (d = 9 for 3x3 convs, 4 for 1x1 / Linear) and "large blocks" (18 / 8) regimes, sized
for a file >= 20x smaller than fp32 (target: <= 1.0 point lost) and >= 30x; at the same file
size, scalar k-means weight sharing (``share_weights_``, bits chosen to fit the bytes) and PQ
with the weight-space objective. For LeNet-5 and LeNet-300-100: PQ alone and prune -> PQ ->
encode, beside the Deep Compression pipeline's ratio (benchmarks/results/deep_compression.json).
A dense control gets the same distillation steps.

Every accuracy is that of the decoded ``.ncz`` file on the test split, evaluated once per row;
every size is the file's bytes against the fp32 state dict. Choices are made without the test
split: each layer's k comes from a bits-per-weight budget, the largest whose file meets the
ratio target when every layer holds k random codewords at uniformly random codes (the
entropy-coded codes of a real quantized layer are no longer than uniform ones); the number of global
fine-tuning steps is the checkpoint with the best held-out accuracy (0 included); block sizes
and learning rates of the LeNet rows are those of the explored variant (EXPLORE below,
``--explore``) with the best held-out accuracy.

A layer-level ablation (``--parts layers``) quantizes each 3x3 conv of ResNet-20 alone with the
activation objective (per-block and shared metric) and the weight objective, EM only, and
compares the network's KL divergence to the baseline on held-out images.

Run from benchmarks/:  ../.venv/bin/python pq.py [--parts layers,resnet20,lenet5,lenet300]
[--rows LABEL,...] [--seeds 0,1,2] [--smoke]. Each (part, row, seed) is saved under
out/pq/ and not recomputed; every run merges whatever exists into results/pq.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from _common import PATHS, add_results_dir_arg, baseline, setup, write_result
from nncompress.core import ConfigError, LayerSelector, atomic_write, folded_copy
from nncompress.data import fashion_mnist
from nncompress.engine import TrainConfig, evaluate, load_checkpoint
from nncompress.io import (
    EncodeConfig,
    decode_file,
    encode_state_dict,
    round_for_storage_,
    save_compressed,
)
from nncompress.models import create
from nncompress.quant import (
    KMeansConfig,
    PQConfig,
    pq_layers,
    pq_plan,
    pq_quantize_,
    share_weights_,
    shared_layers,
)
from nncompress.quant.pq_finetune import distill, kd, refresh_batchnorm_
from nncompress.quant.pq_transform import QUANTIZABLE

OUT = Path(__file__).resolve().parent / "out" / "pq"
log = logging.getLogger("pq")
ENC = EncodeConfig(codec="ans", codebook_dtype="fp16", dense_dtype="fp16")
SMALL = {"block_size_conv": 9, "block_size_pw": 4, "block_size_fc": 4}
LARGE = {"block_size_conv": 18, "block_size_pw": 8, "block_size_fc": 8}


@dataclass(frozen=True)
class Row:
    """One reported row (see the module docstring)."""

    model: str
    label: str
    method: str  # 'pq', 'kmeans' (scalar weight sharing) or 'dense' (control)
    target: float | None = None  # file ratio the budget is sized for
    blocks: dict = field(default_factory=lambda: dict(SMALL))
    objective: str = "activation"
    layer_steps: int = 25
    layer_lr: float = 0.1
    global_steps: int = 400
    global_lr: float = 0.02
    checkpoints: int = 4  # held-out evaluations during the global fine-tuning
    exclude: tuple[str, ...] = ()
    prune: dict | None = None  # PruneStageConfig fields: prune -> (retrain) -> PQ
    match: str | None = None  # kmeans: label of the row whose file bytes it must not exceed
    max_k: int = 1024
    chosen: bool = False  # blocks and learning rates: the best held-out explored variant


def _choose(row: Row) -> Row:
    """``row`` with the blocks and learning rates of the explored variant (same model,
    activation objective, out/pq/explore) whose decoded file had the best held-out accuracy."""
    runs = [json.loads(p.read_text()) for p in sorted((OUT / "explore").glob("*.json"))]
    runs = [
        r for r in runs if r["row"]["model"] == row.model and r["row"]["objective"] == "activation"
    ]
    if not runs:
        raise SystemExit(f"{row.model}: run the exploration first (pq.py --explore)")
    best = max(runs, key=lambda r: r["val_accuracy_decoded"])["row"]
    log.info("%s / %s: held-out choice '%s'", row.model, row.label, best["label"])
    return replace(
        row,
        blocks=best["blocks"],
        layer_lr=best["layer_lr"],
        global_lr=best["global_lr"],
        exclude=tuple(best["exclude"]),
    )


# ResNet-20: the first conv (144 weights) stays fp16 as in the reference code; fine-tuning
# sized so that a whole row takes well under 30 minutes on one core (1 s per step)
R20 = {"exclude": ("conv1",), "layer_steps": 20, "global_steps": 320}
L300_B8 = {"block_size_fc": 8, "per_layer_block_size": {"fc2": 4, "fc3": 4}}
L300_B16 = {"block_size_fc": 16, "per_layer_block_size": {"fc2": 12, "fc3": 4}}
# the Deep Compression recipes' pruning (recipes/deep-compression-*.yaml)
L300_PRUNE = {
    "method": "magnitude",
    "sparsity": 0.92,
    "per_layer": {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74},
    "iterations": 3,
    "epochs": 10,
    "lr_scale": 0.5,
    "distill": {"temperature": 4, "alpha": 0.7},
}
L5_PRUNE = {
    "method": "magnitude",
    "sparsity": 0.92,
    "per_layer": {"conv1": 0.34, "conv2": 0.88, "fc1": 0.92, "fc2": 0.81},
    "iterations": 3,
    "epochs": 5,
    "lr_scale": 0.5,
}
# final LeNet rows: the LeNets are cheap, so the fine-tuning is 5x the exploration's (the
# global steps are still chosen on held-out among 5 checkpoints)
LENET = {"layer_steps": 100, "global_steps": 2000, "checkpoints": 5}
L5_EXCLUDE = ("conv1",)  # 500 weights in 20 kernels: kept fp16 (1 KB) as ResNet's first conv
# Held-out exploration (--explore): variants run on the same seed, scored by the held-out
# accuracy of their decoded file; the test split is never evaluated. results/pq.md lists them.
EXPLORE = {
    "lenet300": [
        Row("lenet-300-100", "40x d=4", "pq", 40, {"block_size_fc": 4}),
        Row("lenet-300-100", "40x d=8 (fc2, fc3: 4)", "pq", 40, L300_B8),
        Row("lenet-300-100", "40x d=16 (fc2: 12, fc3: 4)", "pq", 40, L300_B16),
        Row("lenet-300-100", "40x d=8, lr x2", "pq", 40, L300_B8, layer_lr=0.2, global_lr=0.05),
        Row("lenet-300-100", "40x d=8, weight objective", "pq", 40, L300_B8, objective="weight"),
    ],
    "lenet5": [
        Row(
            "lenet-5",
            "40x conv 25, fc 4",
            "pq",
            40,
            {"block_size_conv": 25, "block_size_fc": 4},
            exclude=L5_EXCLUDE,
        ),
        Row(
            "lenet-5",
            "40x conv 25, fc 8",
            "pq",
            40,
            {"block_size_conv": 25, "block_size_fc": 8, "per_layer_block_size": {"fc2": 4}},
            exclude=L5_EXCLUDE,
        ),
        Row(
            "lenet-5",
            "40x conv 5, fc 8",
            "pq",
            40,
            {"block_size_conv": 5, "block_size_fc": 8, "per_layer_block_size": {"fc2": 4}},
            exclude=L5_EXCLUDE,
        ),
        Row(
            "lenet-5",
            "40x conv 25, fc 16",
            "pq",
            40,
            {"block_size_conv": 25, "block_size_fc": 16, "per_layer_block_size": {"fc2": 4}},
            exclude=L5_EXCLUDE,
        ),
    ],
    "resnet20": [],
}
ROWS = {
    "resnet20": [
        Row("resnet-20", "pq small blocks 20x", "pq", 20, SMALL, **R20),
        Row("resnet-20", "pq large blocks 20x", "pq", 20, LARGE, **R20),
        Row("resnet-20", "pq small blocks 30x", "pq", 30, SMALL, **R20),
        Row("resnet-20", "pq large blocks 30x", "pq", 30, LARGE, **R20),
        Row(
            "resnet-20",
            "k-means sharing at the bytes of pq small 20x",
            "kmeans",
            match="pq small blocks 20x",
            **R20,
        ),
        Row(
            "resnet-20",
            "pq weight objective, small 20x",
            "pq",
            20,
            SMALL,
            objective="weight",
            **R20,
        ),
        Row("resnet-20", "dense control (same distillation)", "dense", **{**R20, "layer_steps": 0}),
    ],
    "lenet5": [
        Row("lenet-5", "pq 40x", "pq", 40, chosen=True, **LENET),
        Row(
            "lenet-5", "pq weight objective 40x", "pq", 40, objective="weight", chosen=True, **LENET
        ),
        Row("lenet-5", "prune -> pq 60x", "pq", 60, prune=L5_PRUNE, chosen=True, **LENET),
        Row("lenet-5", "dense control (same distillation)", "dense", **{**LENET, "layer_steps": 0}),
    ],
    "lenet300": [
        Row("lenet-300-100", "pq 40x", "pq", 40, chosen=True, **LENET),
        Row(
            "lenet-300-100",
            "pq weight objective 40x",
            "pq",
            40,
            objective="weight",
            chosen=True,
            **LENET,
        ),
        Row("lenet-300-100", "prune -> pq 60x", "pq", 60, prune=L300_PRUNE, chosen=True, **LENET),
        Row(
            "lenet-300-100",
            "dense control (same distillation)",
            "dense",
            **{**LENET, "layer_steps": 0},
        ),
    ],
}


# ----------------------------------------------------------------------------- helpers


class _Limited:
    """The first ``n`` batches of a loader (for --smoke)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i >= self.n:
                return
            yield b

    def __len__(self) -> int:
        return min(self.n, len(self.loader))


def _loaders(splits, base: TrainConfig, seed: int, smoke: bool):
    calib = splits.loader("train", 128, seed=seed, augment=base.augment)
    val = splits.loader("val", 1000)
    test = splits.loader("test", 1000)
    if smoke:
        calib, val, test = _Limited(calib, 3), _Limited(val, 1), _Limited(test, 1)
    return calib, val, test


def _with_blocks(config: EncodeConfig, blocks: dict[str, int]) -> EncodeConfig:
    """``config`` with the pq block size of each product-quantized layer's weight forced (the
    encoder only tries its default sizes on plain weights)."""
    return replace(config, pq_block_size={f"{n}.weight": d for n, d in blocks.items()})


def _file_bytes(model: nn.Module, config: EncodeConfig) -> int:
    plain = folded_copy(model)
    round_for_storage_(plain, config)
    data, _ = encode_state_dict(plain, config)
    return len(data)


def _stand_in(model: nn.Module, plan: dict, seed: int) -> nn.Module:
    """A copy whose planned layers hold k random fp16 codewords at uniformly random codes
    (all-zero blocks kept) and whose other float tensors are made incompressible (BatchNorm
    statistics change after quantization): its file bounds the quantized model's."""
    g = torch.Generator().manual_seed(seed)
    out = folded_copy(model)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):  # the rest: incompressible
            if t.is_floating_point():
                t.add_(1e-3 * torch.randn(t.shape, generator=g))
        for name, p in plan.items():
            w = mods[name].weight
            d, k = p["block_size"], p["k"]
            rows = w.reshape(-1, d)  # (n, d)
            zero = ~rows.ne(0).any(1)
            cb = torch.randn(k, d, generator=g).half().float()  # (k, d)
            codes = torch.arange(len(rows)) % k
            codes = codes[torch.randperm(len(rows), generator=g)]
            new = torch.where(zero.unsqueeze(1), torch.zeros(()), cb[codes])
            w.copy_(new.reshape(w.shape))
    return out


def _pq_config(blocks: dict, max_k: int, bpw: float, model, exclude) -> PQConfig:
    """The budget's config; a layer too small for the budget (its codebook alone exceeds it)
    gets k = 2 instead of stopping the search (such layers hold a few hundred weights)."""
    cfg = PQConfig(**blocks, k=max_k, bits_per_weight=bpw)
    small = {}
    for name in (QUANTIZABLE & LayerSelector(exclude=exclude)).select(model):
        try:
            pq_plan(model, cfg, filter=[name])
        except ConfigError as exc:
            if "cannot be met" not in str(exc):
                raise
            small[name] = 2
    return replace(cfg, per_layer_k={**cfg.per_layer_k, **small}) if small else cfg


def _budget(model, blocks, target, fp32_bytes, exclude, max_k, steps=12):
    """The largest bits-per-weight budget (bisection to 0.01) whose stand-in file meets the
    ratio target; returns (budget, planned bytes, per-layer k overrides)."""
    limit = fp32_bytes / target
    lo, hi, best = 0.05, 8.0, None
    for _ in range(steps):  # bisection on the budget (bytes grow with it)
        mid = round((lo + hi) / 2, 2)
        cfg = _pq_config(blocks, max_k, mid, model, exclude)
        plan = pq_plan(model, cfg, filter=LayerSelector(exclude=exclude))
        ds = {n: p["block_size"] for n, p in plan.items()}
        size = _file_bytes(_stand_in(model, plan, 0), _with_blocks(ENC, ds))
        if size <= limit:
            best, lo = (mid, size, cfg.per_layer_k), mid
        else:
            hi = mid
        if hi - lo <= 0.011:
            break
    if best is None:
        raise RuntimeError(f"no budget reaches {target}x")
    return best


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _round_(model: nn.Module) -> None:
    with torch.no_grad():
        for p in list(pq_layers(model).values()) + list(shared_layers(model).values()):
            p.codebook.copy_(p.codebook.half().float())


def _global_finetune(model, teacher, params, calib, val, row: Row, steps: int) -> dict:
    """Distillation of ``params`` in chunks; after each, codebooks rounded to fp16 and BN
    refreshed, held-out accuracy measured; the best checkpoint (0 included) is kept."""
    t0 = time.perf_counter()
    hist = []
    best = None
    chunk = max(1, steps // row.checkpoints) if steps else 0
    done = 0
    while True:
        _round_(model)
        refresh_batchnorm_(model, calib, 20)
        acc = evaluate(model, val)["accuracy"]
        hist.append({"steps": done, "val_accuracy": acc})
        if best is None or acc > best[0]:
            best = (acc, done, _state(model))
        if done >= steps:
            break
        distill(
            model,
            teacher,
            params,
            calib,
            chunk,
            row.global_lr,
            momentum=0.9,
            temperature=1.0,
            train=True,
            progress=None,
            task="global",
        )
        done += chunk
    model.load_state_dict(best[2])
    return {
        "checkpoints": hist,
        "chosen_steps": best[1],
        "val_accuracy": best[0],
        "wall_s": time.perf_counter() - t0,
    }


def _prune(model, teacher, splits, base: TrainConfig, spec: dict, smoke: bool) -> dict:
    from nncompress.distill import distillation_loss
    from nncompress.prune.schedule import iterative_prune_
    from nncompress.stages.prune import PruneStageConfig

    cfg = PruneStageConfig.from_dict({**spec, "epochs": 0 if smoke else spec.get("epochs", 0)})
    retrain = cfg.retrain.train_config(base)
    train = splits.loader("train", retrain.batch_size, seed=retrain.seed, augment=retrain.augment)
    kd = cfg.retrain.distill
    loss_fn = None if kd is None else distillation_loss(teacher, kd)
    t0 = time.perf_counter()
    its = iterative_prune_(
        model,
        cfg.magnitude_config(),
        train,
        retrain,
        iterations=cfg.iterations,
        lr_scale=cfg.retrain.lr_scale,
        val_loader=splits.loader("val", 1000) if retrain.epochs else None,
        loss_fn=loss_fn,
    )
    w = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    kept = sum(int(t.ne(0).sum()) for t in w) / sum(t.numel() for t in w)
    return {"kept": kept, "iterations": len(its), "wall_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- one row


def _encode_and_test(model, row, seed, sidecar, test, val) -> dict:
    """Fold, round as stored, write the .ncz, decode it into a fresh model: the decoded model's
    held-out and test accuracy (the test split's one use), bytes, ratio, per-layer bits."""
    enc = _with_blocks(ENC, {n: p.pq_block_size for n, p in pq_layers(model).items()})
    plain = folded_copy(model)
    round_for_storage_(plain, enc)
    path = OUT / f"{row.model}-{_slug(row.label)}-s{seed}.ncz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = sidecar["architecture"]
    rep = save_compressed(plain, path, enc, {"architecture": arch})
    state, _ = decode_file(path)
    exact = all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    fresh = create(arch["model"], **arch["kwargs"])
    fresh.load_state_dict(state)
    layers = {
        t.name.removesuffix(".weight"): {
            "scheme": t.scheme,
            "d": t.block_size,
            "k": t.codebook_size,
            "bits_per_weight": t.bits_per_weight,
            "bytes": t.total_bytes,
        }
        for t in rep.tensors
        if t.name.endswith(".weight") and len(t.shape) >= 2
    }
    return {
        "file_bytes": path.stat().st_size,
        "fp32_bytes": rep.original_bytes,
        "ratio": rep.original_bytes / path.stat().st_size,
        "decoded_equals_evaluated": exact,
        "val_accuracy_decoded": evaluate(fresh, val)["accuracy"],
        "test_accuracy": None if test is None else evaluate(fresh, test)["accuracy"],
        "layers": layers,
    }


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-")


def run_row(
    row: Row, seed: int, splits, smoke: bool, matched_bytes: int | None, explore: bool = False
) -> dict:
    if row.chosen and not (smoke and not any((OUT / "explore").glob("*.json"))):
        row = _choose(row)  # (a smoke run without a smoke exploration keeps the row as is)
    torch.manual_seed(seed)
    model, sidecar = load_checkpoint(baseline(row.model))
    base = TrainConfig(**(sidecar.get("extra") or {}).get("train_config", {}))
    teacher = copy.deepcopy(model).eval()
    calib, val, test = _loaders(splits, base, seed, smoke)
    if explore:
        test = None  # held-out exploration: the test split is not touched
    steps = 8 if smoke else row.global_steps
    # smoke: at most 32 codewords per layer (the E-step over 1024 codewords took most of the
    # smoke's time; the code path is the same)
    max_k = min(row.max_k, 32) if smoke else row.max_k
    out: dict = {"row": asdict(row), "seed": seed, "timings": {}}
    if row.prune:
        out["prune"] = _prune(model, teacher, splits, base, row.prune, smoke)
        out["timings"]["prune_s"] = out["prune"]["wall_s"]
    fp32 = encode_state_dict(folded_copy(model), replace(ENC, dense_dtype="fp32"))[1].original_bytes
    if row.method == "pq":
        bpw, planned, small = _budget(
            # the smoke's tiny nets are mostly fp16 biases / BatchNorm: 20x is out of reach
            model,
            row.blocks,
            2.0 if smoke else row.target,
            fp32,
            row.exclude,
            max_k,
            7 if smoke else 12,
        )
        cfg = PQConfig(
            **{**row.blocks, "per_layer_k": {**row.blocks.get("per_layer_k", {}), **small}},
            k=max_k,
            bits_per_weight=bpw,
            objective=row.objective,
            layer_steps=2 if smoke else row.layer_steps,
            layer_lr=row.layer_lr,
            global_steps=0,
            bn_batches=0,
            seed=seed,
            calibration_batches=2 if smoke else 8,
        )
        rep = pq_quantize_(
            model, cfg, calib, teacher=teacher, filter=LayerSelector(exclude=row.exclude)
        )
        out.update(bits_per_weight_budget=bpw, planned_bytes=planned, k_2_layers=small)
        out["pq"] = rep.to_dict()
        out["timings"].update(
            capture_s=rep.timings["capture_s"],
            em_s=rep.timings["em_s"],
            layer_finetune_s=rep.timings["layer_finetune_s"],
        )
        params = [p.codebook for p in pq_layers(model).values()]
    elif row.method == "kmeans":
        bits = None
        for b in (4, 3, 2, 1):  # the most bits whose file fits the matched row's bytes
            trial = copy.deepcopy(model)
            share_weights_(
                trial,
                KMeansConfig(bits_conv=b, bits_fc=b),
                filter=LayerSelector(exclude=row.exclude),
            )
            size = _file_bytes(trial, ENC)
            if matched_bytes is None or size <= matched_bytes or b == 1:
                bits = b
                break
        t0 = time.perf_counter()
        share_weights_(
            model,
            KMeansConfig(bits_conv=bits, bits_fc=bits),
            filter=LayerSelector(exclude=row.exclude),
        )
        out["timings"]["kmeans_s"] = time.perf_counter() - t0
        out.update(bits=bits, matched_bytes=matched_bytes)
        params = [p.codebook for p in shared_layers(model).values()]
    else:  # dense control: the same distillation on every weight
        params = [p for p in model.parameters() if p.dim() > 1]
    out["global"] = _global_finetune(model, teacher, params, calib, val, row, steps)
    out["timings"]["global_finetune_s"] = out["global"]["wall_s"]
    out.update(_encode_and_test(model, row, seed, sidecar, test, val))
    out["timings"]["total_s"] = sum(v for v in out["timings"].values())
    return out


# ----------------------------------------------------------------------------- report


def _baseline_acc(name: str, splits) -> float:
    model, _ = load_checkpoint(baseline(name))
    return evaluate(model, splits.loader("test", 1000))["accuracy"]


def _dc_ratio(name: str) -> str:
    """The Deep Compression recipe's ratio and accuracy (results/deep_compression.json)."""
    path = PATHS.results / "deep_compression.json"
    try:
        runs = json.loads(path.read_text())["models"][name]["variants"]["recipe"]["runs"]
        test = statistics.mean(r["test_accuracy"] for r in runs)
        ratio = statistics.mean(r["ratio"] for r in runs)
        return (
            f"{ratio:.1f}x at {test:.2f}% test accuracy (mean of {len(runs)} seeds, "
            "results/deep_compression.md)"
        )
    except (OSError, KeyError, TypeError, ValueError, statistics.StatisticsError):
        return "not measured (results/deep_compression.json has no recipe rows for this model)"


def _summary(runs: list[dict]) -> dict:
    def ms(key):
        vals = [r[key] for r in runs]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    return {
        "seeds": [r["seed"] for r in runs],
        "test_accuracy": ms("test_accuracy"),
        "ratio": ms("ratio"),
        "file_bytes": ms("file_bytes"),
    }


ABLATION_METHODS = (("activation", "block"), ("activation", "shared"), ("weight", "block"))


def layer_ablation(splits, smoke: bool) -> None:
    """Each 3x3 conv of ResNet-20 quantized alone (k = 256, d = 9, EM only: no fine-tuning, no
    BatchNorm refresh) with each objective; the network's KL to the baseline and top-1
    agreement on 2000 held-out images (no test data). Writes out/pq/layers.json."""
    path = OUT / "layers.json"
    if path.exists():
        return
    model, _ = load_checkpoint(baseline("resnet-20"))
    model.eval()
    n = 1 if smoke else 8
    batches = zip(splits.loader("val", 250), range(n), strict=False)
    xv = torch.cat([b[0] for b, _ in batches])  # (250 n, 1, 28, 28)
    with torch.no_grad():
        ref = model(xv)
    calib = splits.loader("train", 128, seed=1)
    convs = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and name != "conv1"
    ]
    rows = []
    for name in convs[:2] if smoke else convs:
        for objective, metric in ABLATION_METHODS:
            m = copy.deepcopy(model)
            cfg = PQConfig(
                k=256,
                objective=objective,
                metric=metric,
                layer_steps=0,
                bn_batches=0,
                calibration_batches=2 if smoke else 8,
            )
            t0 = time.perf_counter()
            rep = pq_quantize_(m, cfg, calib, filter=[name])
            with torch.no_grad():
                out = m.eval()(xv)
            rows.append(
                {
                    "layer": name,
                    "objective": objective,
                    "metric": metric,
                    "k": rep.layers[0].k,
                    "kl": float(kd(out, ref, 1.0)),
                    "agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
                    "wall_s": time.perf_counter() - t0,
                }
            )
            log.info("ablation %s %s/%s: KL %.5f", name, objective, metric, rows[-1]["kl"])
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(rows, indent=1)))


def _ablation_md() -> list[str]:
    path = OUT / "layers.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    md = [
        "",
        "## Layer-level ablation: which objective (ResNet-20, held-out split)",
        "",
        "Each 3x3 conv quantized alone (k = 256, d = 9, EM only: no fine-tuning), the network's"
        " KL divergence to the baseline on 2000 held-out images (lower is better); `block` keeps"
        " one Gram matrix per block, `shared` sums them (the reference code), `weight` is plain"
        " k-means of the subvectors.",
        "",
        "| layer | k | " + " | ".join(f"KL {o}/{m}" for o, m in ABLATION_METHODS) + " |",
        "|---|---:|" + "---:|" * len(ABLATION_METHODS),
    ]
    by_layer: dict[str, dict] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[(r["objective"], r["metric"])] = r
    wins = {k: 0 for k in ABLATION_METHODS}
    for layer, rs in by_layer.items():
        kls = [rs[k]["kl"] for k in ABLATION_METHODS]
        wins[ABLATION_METHODS[kls.index(min(kls))]] += 1
        k = next(iter(rs.values()))["k"]
        md.append(f"| {layer} | {k} | " + " | ".join(f"{v:.5f}" for v in kls) + " |")
    total = {k: sum(by_layer[l][k]["kl"] for l in by_layer) for k in ABLATION_METHODS}
    md.append("| sum | | " + " | ".join(f"{total[k]:.5f}" for k in ABLATION_METHODS) + " |")
    md += [
        "",
        "Lowest KL in "
        + ", ".join(f"{o}/{m}: {wins[(o, m)]}" for o, m in ABLATION_METHODS)
        + f" of {len(by_layer)} layers.",
    ]
    return md


def merge(splits) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*-s*.json"))]
    parts: dict[str, dict] = {}
    for r in runs:
        parts.setdefault(r["row"]["model"], {}).setdefault(r["row"]["label"], []).append(r)
    md = [
        "# Product quantization (Stock et al. 2020) on Fashion-MNIST",
        "",
        "Accuracy of the decoded `.ncz` file on the 10k test split (evaluated once per row and "
        "seed); ratio = fp32 state dict bytes / file bytes; mean +- std over the seeds listed.",
    ]
    data: dict = {"models": {}}
    for model, rows in parts.items():
        base = _baseline_acc(model, splits)
        md += ["", f"## {model} (baseline {base:.2f}%)", ""]
        if model.startswith("lenet"):
            md += [f"Deep Compression pipeline (recipe): {_dc_ratio(model)}", ""]
        md += [
            "| row | seeds | test acc. % | drop (points) | file bytes | ratio | target met |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        data["models"][model] = {"baseline_test_accuracy": base, "rows": {}}
        for label, rr in rows.items():
            s = _summary(rr)
            data["models"][model]["rows"][label] = {"summary": s, "runs": rr}
            acc, ratio = s["test_accuracy"], s["ratio"]
            target = rr[0]["row"]["target"]
            met = ""
            if target:
                ok = ratio[0] >= target and base - acc[0] <= 1.0
                met = f"{'yes' if ok else 'no'} (>= {target}x, <= 1.0 point)"
            md.append(
                f"| {label} | {len(rr)} | {acc[0]:.2f} +- {acc[1]:.2f} | {base - acc[0]:.2f} | "
                f"{s['file_bytes'][0]:,.0f} | {ratio[0]:.1f}x | {met} |"
            )
        md += ["", "Wall time per stage (s, first seed):", ""]
        md += ["| row | " + " | ".join(_STAGES) + " |", "|---|" + "---:|" * len(_STAGES)]
        for label, rr in rows.items():
            t = rr[0]["timings"]
            md.append(f"| {label} | " + " | ".join(f"{t.get(k, 0):.0f}" for k in _STAGES) + " |")
    md += _ablation_md()
    explored = [json.loads(p.read_text()) for p in sorted((OUT / "explore").glob("*.json"))]
    if explored:
        md += [
            "",
            "## Held-out exploration (decoded file's val accuracy; test split not used)",
            "",
            "| model | variant | seed | val acc. % | ratio | bits/weight budget | global steps kept |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in explored:
            md.append(
                f"| {r['row']['model']} | {r['row']['label']} | {r['seed']} | "
                f"{r['val_accuracy_decoded']:.2f} | {r['ratio']:.1f}x | "
                f"{r.get('bits_per_weight_budget', '')} | {r['global']['chosen_steps']} |"
            )
        data["explore"] = explored
    # every merged row's measured stages (a merging run itself computes nothing)
    data["compute_s"] = sum(
        r["timings"].get("total_s", 0.0) for r in runs + data.get("explore", [])
    )
    write_result("pq", data, "\n".join(md))


_STAGES = [
    "prune_s",
    "capture_s",
    "em_s",
    "layer_finetune_s",
    "kmeans_s",
    "global_finetune_s",
    "total_s",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="lenet300,lenet5,resnet20")
    ap.add_argument("--rows", default="", help="comma-separated row labels (default: all)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--smoke", action="store_true", help="tiny data, a few steps (seconds)")
    ap.add_argument(
        "--explore", action="store_true", help="run the held-out exploration rows (no test)"
    )
    add_results_dir_arg(ap)
    args = ap.parse_args(argv)
    setup(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    global OUT
    if args.smoke:
        OUT = PATHS.out / "pq-smoke"
    if args.explore:
        OUT = OUT / "explore"
    table = EXPLORE if args.explore else ROWS
    splits = fashion_mnist()
    wanted = {r for r in args.rows.split(",") if r}
    for part in [p for p in args.parts.split(",") if p]:
        if part == "layers":
            layer_ablation(splits, args.smoke)
            continue
        if part not in table:
            raise SystemExit(f"--parts: {part!r} is not one of {sorted(table)}")
        # --smoke: the first row of each part only (every row's code path is the same)
        for row in table[part][:1] if args.smoke else table[part]:
            if wanted and row.label not in wanted:
                continue
            for seed in [int(s) for s in args.seeds.split(",")]:
                path = OUT / f"{row.model}-{_slug(row.label)}-s{seed}.json"
                if path.exists():
                    continue
                matched = None
                if row.match:
                    src = OUT / f"{row.model}-{_slug(row.match)}-s{seed}.json"
                    if not src.exists():
                        log.warning("%s: run '%s' first (seed %d)", row.label, row.match, seed)
                        continue
                    matched = json.loads(src.read_text())["file_bytes"]
                log.info("%s / %s / seed %d", row.model, row.label, seed)
                res = run_row(row, seed, splits, args.smoke, matched, args.explore)
                log.info(
                    "%s: val %.2f%%, test %s, %d bytes (%.1fx)",
                    row.label,
                    res["val_accuracy_decoded"],
                    res["test_accuracy"],
                    res["file_bytes"],
                    res["ratio"],
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(
                    path, lambda p, r=res: p.write_text(json.dumps(r, indent=1, default=str))
                )
    if not args.smoke:
        OUT = OUT.parent if args.explore else OUT
        merge(splits)


if __name__ == "__main__":
    main()
