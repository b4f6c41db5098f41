"""Model transform of product quantization (Stock et al., ICLR 2020, "And the Bit Goes Down").

:func:`pq_quantize_` quantizes a network's Conv2d / Linear layers bottom-up (section 3 of the
paper):

1. For each layer in forward order, its input ``X`` is captured by a forward hook from the
   network whose *lower layers are already quantized* (so each layer corrects the error of
   the ones before it), on a bounded number of rows sampled from the calibration batches; only
   the per-block Gram matrices ``X_s^T X_s`` are kept (:func:`nncompress.quant.pq.block_grams`).
2. EM (:func:`nncompress.quant.pq.pq_em_grams`) learns the layer's codebook and assignments;
   a :class:`~nncompress.quant.pq.PQWeight` parametrization
   ``weight = gather(codebook, assignments)`` replaces the weight. A layer with a bias then
   absorbs its mean output error into the bias (bias correction), and its codebook is fitted
   to centered inputs (covariance instead of Gram), since the mean error costs nothing then.
3. The layer's codewords are fine-tuned by distillation from the uncompressed teacher, with no
   labels (kept only if the loss on a calibration batch went down): the loss is ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` on the network's
   outputs, the student in eval mode (BatchNorm statistics frozen). The gradient of a codeword
   is the *average* of the gradients of its subvectors: the parametrization divides autograd's
   sum by the cluster size in the backward pass (``centroid_grad='mean'``), so ``layer_lr`` is a
   per-weight learning rate as in the paper's CentroidSGD.
4. When every layer is done, all codewords are fine-tuned together the same way with the
   network in train mode, codebooks are rounded to fp16 (what the ``.ncz`` file stores, so the
   evaluated weights are the stored ones bit for bit) and BatchNorm running statistics are
   recomputed from calibration batches (cumulative average) with the final weights.

k per layer is an integer (clamped, as in the reference code, to the largest power of two that
leaves at least ``min_per_codeword`` subvectors per codeword) or derived from a bits-per-weight
budget that counts the fp16 codebook, so that small layers get small codebooks. All-zero
blocks of a pruned layer stay zero and take a reserved code (``zero_blocks``). Every bad input
(block size, k, calibration batch, teacher) raises :class:`ConfigError` before any EM starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.coverage import coverage_report
from ..core.errors import ConfigError
from ..core.modules import folded_copy, model_device
from ..core.progress import Progress, progress_task
from ..core.select import LayerSelector, Selectable
from .pq import (
    PQWeight,
    k_for_budget,
    layer_rows,
    pq_bits,
    pq_em_grams,
)
from .pq_config import PQConfig, PQLayerReport, PQReport
from .pq_finetune import batches, distill, inputs, kd_on, refresh_batchnorm_

__all__ = [
    "QUANTIZABLE",
    "pq_from_values_",
    "pq_layers",
    "pq_plan",
    "pq_quantize_",
]

log = logging.getLogger(__name__)

#: the layer types product quantization applies to
QUANTIZABLE = LayerSelector(types=(nn.Linear, nn.Conv2d))


class _Stop(Exception):
    """Raised by a hook once it has what it needs (saves the rest of the forward)."""


def _pq_param(m: nn.Module) -> PQWeight | None:
    if parametrize.is_parametrized(m, "weight"):
        for p in m.parametrizations["weight"]:
            if isinstance(p, PQWeight):
                return p
    return None


def pq_layers(model: nn.Module) -> dict[str, PQWeight]:
    """The :class:`PQWeight` parametrization of every product-quantized layer, by name."""
    return {n: p for n, m in model.named_modules() if (p := _pq_param(m)) is not None}


@dataclass
class _Plan:
    name: str
    module: nn.Module
    d: int
    k: int
    subvectors: int
    zero_blocks: int
    groups: int


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def _plan_layer(name: str, m: nn.Module, cfg: PQConfig) -> _Plan:
    """Block size and k of one layer, with every check that does not need data."""
    w = m.weight.detach()
    d = cfg.block_size_for(name, m)
    L = math.prod(w.shape[1:])
    groups = m.groups if isinstance(m, nn.Conv2d) else 1
    if L % d:
        divisors = [q for q in range(1, min(L, 64) + 1) if L % q == 0]
        raise ConfigError(
            f"layer '{name}': block_size={d} does not divide its row length {L} "
            f"(weight {tuple(w.shape)}); allowed: a divisor such as {divisors}"
        )
    n_sub = w.numel() // d
    rows = w.reshape(-1, d)  # (n_sub, d)
    zeros = int((~rows.ne(0).any(1)).sum()) if cfg.zero_blocks else 0
    active = n_sub - zeros
    if name in cfg.per_layer_k:
        k = cfg.per_layer_k[name]
        if k > active:
            raise ConfigError(
                f"per_layer_k['{name}']={k}: above the layer's {active} subvectors to quantize "
                f"(d={d}); allowed: 1..{active}"
            )
    elif cfg.bits_per_weight is not None:
        k = k_for_budget(
            n_sub,
            d,
            cfg.bits_per_weight,
            max_k=min(cfg.k, active),
            min_per_codeword=cfg.min_per_codeword,
            zero_code=zeros > 0,
        )
        if k == 0:
            need = pq_bits(n_sub, 2, d, zero_code=zeros > 0) / w.numel()
            raise ConfigError(
                f"layer '{name}': bits_per_weight={cfg.bits_per_weight} cannot be met (k=2 "
                f"already takes {need:.3f} bits per weight with its fp16 codebook, {n_sub} "
                f"subvectors of d={d}); exclude the layer with filter= or raise the budget"
            )
    else:
        k = cfg.k
        if cfg.min_per_codeword:
            k = min(k, max(1, _pow2_floor(active // cfg.min_per_codeword)))
        elif k > active:
            raise ConfigError(
                f"k={k}: above layer '{name}''s {active} subvectors to quantize (d={d}); "
                f"allowed: 1..{active} (or min_per_codeword > 0 to clamp)"
            )
    if active == 0:
        raise ConfigError(f"layer '{name}': every block is zero; nothing to quantize")
    return _Plan(name, m, d, k, n_sub, zeros, groups)


def _check_data(model, teacher, loader, plans, device) -> list[_Plan]:
    """One calibration batch through student and teacher: shapes, and the forward order."""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise ConfigError("calibration_loader: yielded no batches") from None
    x = inputs(batch).to(device)
    order: list[nn.Module] = []
    hooks = [
        p.module.register_forward_pre_hook(lambda mod, inp: order.append(mod) and None)
        for p in plans
    ]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure here is the loader's shape or dtype
        raise ConfigError(
            f"calibration_loader: a batch of shape {tuple(x.shape)} does not fit the model: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        t_out = teacher(x)
    if not isinstance(out, torch.Tensor) or not isinstance(t_out, torch.Tensor):
        raise ConfigError("model and teacher must return a tensor of logits")
    if out.shape != t_out.shape:
        raise ConfigError(
            f"teacher: outputs of shape {tuple(t_out.shape)} do not match the model's "
            f"{tuple(out.shape)} on the same calibration batch"
        )
    seen = {id(m): i for i, m in reversed(list(enumerate(order)))}
    missing = [p.name for p in plans if id(p.module) not in seen]
    if missing:
        raise ConfigError(
            f"layers {missing}: not used by the model's forward on a calibration batch, so "
            "they have no inputs to quantize against; exclude them with filter="
        )
    return sorted(plans, key=lambda p: seen[id(p.module)])


def _capture(model, plan: _Plan, loader, cfg: PQConfig, device, gen):
    """Per-block Grams ``(G, L/d, d, d)`` and the mean row ``(G, L)`` of ``max_rows`` input
    rows of the layer, sampled evenly from ``calibration_batches`` batches of the current
    (partly quantized) model; and the number of rows."""
    d, groups = plan.d, plan.groups
    L = math.prod(plan.module.weight.shape[1:])
    acc = torch.zeros(groups, L // d, d, d, dtype=torch.float64, device=device)
    total = torch.zeros(groups * L, dtype=torch.float64, device=device)
    count = [0]
    per_batch = math.ceil(cfg.max_rows / cfg.calibration_batches)

    def hook(mod: nn.Module, inputs: tuple) -> None:
        rows = layer_rows(mod, inputs[0].detach())  # (n, groups*L)
        if rows.shape[0] > per_batch:
            pick = torch.randperm(rows.shape[0], generator=gen)[:per_batch].to(rows.device)
            rows = rows[pick]
        rows = rows.to(torch.float64)
        xb = rows.reshape(rows.shape[0], groups, L // d, d)  # (n, G, m, d)
        acc.add_(torch.einsum("ngmd,ngme->gmde", xb, xb))
        total.add_(rows.sum(0))
        count[0] += rows.shape[0]
        raise _Stop

    h = plan.module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in batches(loader, cfg.calibration_batches, device):
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        h.remove()
    n = max(1, count[0])
    return acc, (total / n).reshape(groups, L), n


def _centered(grams: torch.Tensor, mean: torch.Tensor, n: int) -> torch.Tensor:
    """``sum (x - mu)(x - mu)^T = sum x x^T - n mu mu^T`` per block."""
    g, m, d, _ = grams.shape
    mb = mean.reshape(g, m, d)  # (G, m, d)
    return grams - n * torch.einsum("gmd,gme->gmde", mb, mb)


def _correct_bias_(m: nn.Module, w: torch.Tensor, mean: torch.Tensor) -> float:
    """``b += (W - W_hat) mu``: the layer's mean output on the calibration rows is restored
    (bias correction, as in Nagel et al. 2019, "Data-Free Quantization"). Returns |delta b|."""
    groups = mean.shape[0]
    with torch.no_grad():
        diff = (w - m.weight).reshape(groups, -1, mean.shape[1]).to(torch.float64)  # (G, O/G, L)
        delta = torch.einsum("gol,gl->go", diff, mean).reshape(-1)  # (C_out,)
        m.bias.add_(delta.to(m.bias.dtype))
    return float(delta.norm())


def _round_codebooks_(params: Iterable[PQWeight], dtype: str) -> None:
    if dtype == "fp16":
        with torch.no_grad():
            for p in params:
                p.codebook.copy_(p.codebook.half().to(p.codebook.dtype))


def _quantize_layer(model, teacher, plan, loader, cfg, device, gen, progress) -> PQLayerReport:
    m = plan.module
    t0 = time.perf_counter()
    grams = mean = None
    correct = cfg.bias_correction and isinstance(getattr(m, "bias", None), torch.Tensor)
    if cfg.objective == "activation" or correct:
        grams, mean, n = _capture(model, plan, loader, cfg, device, gen)
        if cfg.objective != "activation":
            grams = None
        elif correct:  # the mean error will be corrected: quantize against the covariance
            grams = _centered(grams, mean, n)
    t1 = time.perf_counter()
    with torch.no_grad():
        w = m.weight.detach()
    fit = pq_em_grams(
        w,
        grams,
        plan.k,
        plan.d,
        cfg.em_iters,
        groups=plan.groups,
        metric=cfg.metric,
        init=cfg.init,
        seed=cfg.seed,
        zero_blocks=cfg.zero_blocks,
    )
    p = PQWeight(fit.codebook, fit.assignments, tuple(w.shape)).to(w.device)
    parametrize.register_parametrization(m, "weight", p, unsafe=True)
    m.parametrizations["weight"].original.requires_grad_(False)
    _round_codebooks_([p], cfg.codebook_dtype)
    if correct:
        _correct_bias_(m, w, mean)
    t2 = time.perf_counter()
    rep = PQLayerReport(
        name=plan.name,
        shape=tuple(w.shape),
        block_size=plan.d,
        k=plan.k,
        subvectors=plan.subvectors,
        zero_blocks=int((fit.assignments < 0).sum()),
        index_bits=0,
        codebook_bits=plan.k * plan.d * 16,
        bits_per_weight=0.0,
        em_iters=fit.n_iter,
        objective=fit.objective,
        reseeded=fit.reseeded,
        em_s=t2 - t1,
        capture_s=t1 - t0,
    )
    rep.index_bits = pq_bits(plan.subvectors, plan.k, plan.d, zero_code=rep.zero_blocks > 0)
    rep.index_bits -= rep.codebook_bits
    rep.bits_per_weight = (rep.index_bits + rep.codebook_bits) / w.numel()
    if cfg.layer_steps:
        x0 = next(iter(batches(loader, 1, device)))
        rep.kd_loss_before = kd_on(model, teacher, x0, cfg.temperature)
        start = p.codebook.detach().clone()
        distill(
            model,
            teacher,
            [p.codebook],
            loader,
            cfg.layer_steps,
            cfg.layer_lr,
            momentum=cfg.momentum,
            temperature=cfg.temperature,
            train=False,
            progress=progress,
            task="pq-layer-finetune",
        )
        _round_codebooks_([p], cfg.codebook_dtype)
        rep.kd_loss_after = kd_on(model, teacher, x0, cfg.temperature)
        if rep.kd_loss_after > rep.kd_loss_before:  # diverged (lr too high): keep EM's codebook
            log.warning(
                "pq %s: fine-tuning raised the distillation loss (%.4g -> %.4g); reverted",
                plan.name,
                rep.kd_loss_before,
                rep.kd_loss_after,
            )
            with torch.no_grad():
                p.codebook.copy_(start)
            rep.finetune_reverted = True
    rep.finetune_s = time.perf_counter() - t2
    return rep


def pq_from_values_(
    model: nn.Module,
    block_sizes: dict[str, int],
    *,
    max_fraction: float = 0.5,
) -> list[str]:
    """Rebuild :class:`PQWeight` parametrizations from plain weights (a folded checkpoint).

    For each ``{layer: d}``, a Conv2d / Linear whose ``d``-subvectors take at most
    ``max_fraction`` of their count distinct nonzero values gets ``weight = gather(codebook,
    assignments)`` with those values as the codebook (all-zero blocks: code ``-1``); the
    effective weight is unchanged bit for bit. Layers already quantized, or with more distinct
    subvectors, are left alone. Returns the names of the rebuilt layers.
    """
    mods = dict(model.named_modules())
    unknown = sorted(set(block_sizes) - set(mods))
    if unknown:
        raise ConfigError(f"block_sizes: {unknown} are not modules of the model")
    done = []
    for name, d in block_sizes.items():
        m = mods[name]
        if not QUANTIZABLE(name, m) or _pq_param(m) is not None:
            continue
        w = m.weight.detach()
        if math.prod(w.shape[1:]) % d:
            raise ConfigError(f"block_sizes['{name}']={d}: does not divide its row length")
        rows = w.reshape(-1, d)  # (n, d)
        zero = ~rows.ne(0).any(1)
        values, inverse = torch.unique(rows[~zero], dim=0, return_inverse=True)
        if values.shape[0] == 0 or values.shape[0] > max_fraction * rows.shape[0]:
            continue
        assignments = torch.full((rows.shape[0],), -1, dtype=torch.int64, device=w.device)
        assignments[~zero] = inverse
        p = PQWeight(values, assignments, tuple(w.shape)).to(w.device)
        parametrize.register_parametrization(m, "weight", p, unsafe=True)
        m.parametrizations["weight"].original.requires_grad_(False)
        done.append(name)
    return done


def _plans(model: nn.Module, cfg: PQConfig, filter: Selectable) -> list[_Plan]:
    """Every data-free check (names, block sizes, k) and the per-layer plan."""
    if not isinstance(cfg, PQConfig):
        raise ConfigError(f"config: expected a PQConfig, got {type(cfg).__name__}")
    done = pq_layers(model)
    names = {n for n, _ in model.named_modules()}
    for fname in ("per_layer_k", "per_layer_block_size"):
        unknown = sorted(set(getattr(cfg, fname)) - names)
        if unknown:
            raise ConfigError(f"{fname}: {unknown} are not modules of the model")
    selected = (QUANTIZABLE & LayerSelector.coerce(filter)).select(model)
    plans = [_plan_layer(n, m, cfg) for n, m in selected.items() if n not in done]
    if not plans:
        raise ConfigError("filter: selects no Conv2d / Linear layer left to quantize")
    return plans


def pq_plan(
    model: nn.Module,
    config: PQConfig | None = None,
    *,
    filter: Selectable = None,  # noqa: A002
) -> dict[str, dict[str, int]]:
    """What :func:`pq_quantize_` would do, without data: ``{layer: {"block_size": d, "k": k,
    "subvectors": n, "zero_blocks": z, "bits": fixed-width bits}}`` (fp16 codebook included).
    Raises the same :class:`ConfigError` as the transform for a bad block size or ``k``."""
    out = {}
    for p in _plans(model, config or PQConfig(), filter):
        bits = pq_bits(p.subvectors, p.k, p.d, zero_code=p.zero_blocks > 0)
        out[p.name] = {
            "block_size": p.d,
            "k": p.k,
            "subvectors": p.subvectors,
            "zero_blocks": p.zero_blocks,
            "bits": bits,
        }
    return out


def pq_quantize_(
    model: nn.Module,
    config: PQConfig | None = None,
    calibration_loader: Iterable | None = None,
    *,
    teacher: nn.Module | None = None,
    filter: Selectable = None,  # noqa: A002 - torchao-style keyword
    progress: Progress | None = None,
) -> PQReport:
    """Product-quantize the Conv2d / Linear layers of ``model`` in place (Stock et al. 2020).

    See the module docstring for the procedure. Layers already product-quantized are skipped.

    Parameters
    ----------
    model : any ``nn.Module`` (grouped, depthwise and 1x1 convs included).
    config : :class:`PQConfig`.
    calibration_loader : iterable of input batches or ``(inputs, targets)`` pairs (targets are
        never used); iterated again as often as the fine-tuning needs. Required.
    teacher : the uncompressed model to distil from (default: a frozen copy of ``model``
        taken before quantizing).
    filter : which layers (a :class:`~nncompress.core.LayerSelector`, a predicate
        ``(name, module) -> bool`` or names/globs), among the Conv2d / Linear layers.
    progress : callback receiving :class:`ProgressEvent` (tasks 'pq' per layer,
        'pq-layer-finetune', 'pq-finetune', 'bn-refresh').
    """
    cfg = config or PQConfig()
    if calibration_loader is None:
        raise ConfigError("calibration_loader=None: product quantization needs input batches")
    plans = _plans(model, cfg, filter)
    device = model_device(model)
    if teacher is None:
        teacher = folded_copy(model)
    teacher.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    was = model.training
    model.eval()
    params_total = sum(p.numel() for p in model.parameters())
    try:
        plans = _check_data(model, teacher, calibration_loader, plans, device)
        report = _run(model, teacher, plans, calibration_loader, cfg, device, progress)
    finally:
        model.train(was)
    changed = {r.name: f"d={r.block_size}, k={r.k}" for r in report.layers}
    skipped = {
        n: "already product-quantized" if n in pq_layers(model) else "not selected"
        for n, m in model.named_modules()
        if n and isinstance(m, nn.Conv2d | nn.Linear) and n not in changed
    }
    types = {n: type(m).__name__ for n, m in teacher.named_modules()}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in teacher.named_modules()}
    report.coverage = coverage_report(
        "pq", teacher, changed, skipped, params=params, types=types, params_total=params_total
    )
    report.coverage.warn()
    return report


def _run(model, teacher, plans, loader, cfg: PQConfig, device, progress) -> PQReport:
    """Quantize every planned layer bottom-up, then the global stage (see module docstring)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    report = PQReport()
    t_start = time.perf_counter()
    with progress_task(progress, "pq", len(plans)) as task:
        for plan in plans:
            rep = _quantize_layer(model, teacher, plan, loader, cfg, device, gen, progress)
            report.layers.append(rep)
            log.info(
                "pq %s: d=%d k=%d, %.3f bits/weight, J %.4g -> %.4g in %d iterations",
                plan.name,
                plan.d,
                plan.k,
                rep.bits_per_weight,
                rep.objective[0],
                rep.objective[-1],
                rep.em_iters,
            )
            task.advance(layer=plan.name)
    codebooks = list(pq_layers(model).values())
    t = time.perf_counter()
    if cfg.global_steps:
        distill(
            model,
            teacher,
            [p.codebook for p in codebooks],
            loader,
            cfg.global_steps,
            cfg.global_lr,
            momentum=cfg.momentum,
            temperature=cfg.temperature,
            train=True,  # BatchNorm on batch statistics, as the reference's global stage
            progress=progress,
            task="pq-finetune",
        )
    _round_codebooks_(codebooks, cfg.codebook_dtype)
    t_bn = time.perf_counter()
    if cfg.bn_batches:
        with progress_task(progress, "bn-refresh", cfg.bn_batches):
            refresh_batchnorm_(model, loader, cfg.bn_batches)
    report.timings = {
        "capture_s": sum(r.capture_s for r in report.layers),
        "em_s": sum(r.em_s for r in report.layers),
        "layer_finetune_s": sum(r.finetune_s for r in report.layers),
        "global_finetune_s": t_bn - t,
        "bn_refresh_s": time.perf_counter() - t_bn,
        "total_s": time.perf_counter() - t_start,
    }
    return report
