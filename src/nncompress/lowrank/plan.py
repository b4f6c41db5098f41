"""Per-layer plans of :func:`~nncompress.lowrank.decompose_`: which factorisation fits a
layer, what it costs (parameters, MACs) at a rank, and how ranks are chosen (fixed, fraction,
energy, EVBMF, or a global knob for budgets)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.convs import (
    ConvForm,
    conv_form,
    describe_conv,
    is_conv_leaf,
    is_conv_subclass,
    unrecognised_conv_message,
)
from ..core.validate import config_error as _err
from .config import _SPECTRAL, DecomposeConfig
from .cp import cp_conv, cp_cost
from .rank import evbmf, rank_for_energy
from .separable import separable_conv, separable_cost, separable_full_rank, separable_matrix
from .svd import svd_conv1x1, svd_linear, svd_linear_cost
from .tt import factorize, tt_conv, tt_cost, tt_full_ranks, tt_linear
from .tucker import tucker2_conv, tucker2_cost, tucker2_vbmf_ranks

Rank = int | tuple[int, int] | list[int]


@dataclass
class _Plan:
    name: str
    module: nn.Module
    cfg: DecomposeConfig
    in_shape: tuple[int, ...] | None = None  # one sample's input to the layer
    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None
    positions: int | None = None  # Linear: output rows per sample
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    tt_modes: tuple[list[int], list[int]] | None = None
    form: ConvForm | None = None  # padding of a conv subclass rebuilt from plain convs


def _is_conv1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)


def _grouped(m: nn.Module) -> str | None:
    if m.groups == 1:
        return None
    if m.groups == m.in_channels == m.out_channels:
        return (
            "depthwise convolution: not decomposable (each filter reads one channel, so there "
            "is no channel matrix to factor)"
        )
    return f"grouped convolution (groups={m.groups})"


def _unsupported(method: str, m: nn.Module) -> str | None:
    """Why ``method`` cannot decompose ``m`` (``None`` if it can)."""
    if isinstance(m, nn.Conv2d) and is_conv_subclass(m) and not is_conv_leaf(m):
        return unrecognised_conv_message("this layer", m)
    if method == "svd":
        if isinstance(m, nn.Linear):
            return None
        if not isinstance(m, nn.Conv2d):
            return "not a Linear layer or 1x1 convolution"
        if _grouped(m):
            return _grouped(m)
        if not _is_conv1x1(m):
            return "k x k convolution (svd takes Linear layers and 1x1 convolutions; use tucker2, cp or separable)"  # noqa: E501
        return None
    if method == "tt" and not isinstance(m, nn.Conv2d):
        return None if isinstance(m, nn.Linear) else "not a Linear layer"
    if not isinstance(m, nn.Conv2d):
        return "not a Conv2d layer"
    if method == "tt":
        if _grouped(m):
            return _grouped(m)
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return "string padding or non-zero padding mode"
        return None
    if _grouped(m):
        return _grouped(m)
    if _is_conv1x1(m):
        return "1x1 kernel: use method='svd', which takes it as the (C_out x C_in) matrix it is"
    if method in ("separable", "cp") and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
        return "string padding or non-zero padding mode"
    if method == "separable" and min(m.kernel_size) == 1:
        return "kernel already 1-D"
    return None


def _padding_problem(p: _Plan) -> str | None:
    """For a conv subclass that cp / separable / tt rebuild from plain convolutions: record the
    padding its forward applies (``p.form``), or say why it cannot be known."""
    m = p.module
    if p.cfg.method not in ("cp", "separable", "tt") or not isinstance(m, nn.Conv2d):
        return None
    if not is_conv_subclass(m):
        return None
    form = conv_form(m, p.in_shape)
    if isinstance(form, str):
        return unrecognised_conv_message(p.name, m, form)
    if form.dynamic and p.in_shape is None:
        return (
            f"{describe_conv(m)} computes its padding from the input size: pass input_shape so "
            "that the padding for that size is known"
        )
    p.form = form
    return None


def _plain_conv(m: nn.Conv2d, form: ConvForm) -> nn.Conv2d:
    """``nn.Conv2d`` with ``m``'s weights and its convolution's own padding (the extra padding
    of a subclass's forward goes into an ``nn.ZeroPad2d`` before the factors)."""
    plain = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, form.padding, m.dilation,
        m.groups, bias=m.bias is not None,
    )  # fmt: skip
    with torch.no_grad():
        plain.weight.copy_(m.weight.detach())
        if m.bias is not None:
            plain.bias.copy_(m.bias.detach())
    return plain.to(device=m.weight.device, dtype=m.weight.dtype)


def _full_rank(p: _Plan) -> list[int]:
    m, method = p.module, p.cfg.method
    if method == "svd":
        return [min(m.weight.shape[:2])]
    if method == "separable":
        return [separable_full_rank(m)]
    if method == "tucker2":
        return [m.weight.shape[0], m.weight.shape[1]]
    if method == "cp":
        # generic upper bound on the CP rank: product of all mode sizes but the largest
        return [math.prod(m.weight.shape) // max(m.weight.shape)]
    return tt_full_ranks(*p.tt_modes)


def _orig_cost(p: _Plan) -> tuple[int, int | None]:
    m = p.module
    params = sum(t.numel() for t in (m.weight, m.bias) if t is not None)
    if isinstance(m, nn.Linear):
        return params, None if p.positions is None else p.positions * m.weight.numel()
    if p.out_hw is None:
        return params, None
    return params, p.out_hw[0] * p.out_hw[1] * m.weight.numel()


def _cost(p: _Plan, rank: Rank) -> tuple[int, int | None]:
    m, method = p.module, p.cfg.method
    if method == "svd":
        n_out, n_in = m.weight.shape[:2]
        params = svd_linear_cost(n_in, n_out, rank, m.bias is not None)
        positions = p.positions
        if isinstance(m, nn.Conv2d):  # a 1x1 convolution: the matrix at every output position
            positions = None if p.out_hw is None else p.out_hw[0] * p.out_hw[1]
        return params, None if positions is None else positions * rank * (n_in + n_out)
    if method == "separable":
        return separable_cost(m, rank, p.in_hw, p.out_hw)
    if method == "tucker2":
        return tucker2_cost(m, rank, p.in_hw, p.out_hw)
    if method == "cp":
        return cp_cost(m, rank, p.in_hw, p.out_hw)
    positions = p.positions
    if isinstance(m, nn.Conv2d):
        positions = None if p.out_hw is None else p.out_hw[0] * p.out_hw[1]
    return tt_cost(*p.tt_modes, rank, m.bias is not None, positions)


def _clamp(p: _Plan, rank: Rank) -> Rank:
    full, lo = _full_rank(p), p.cfg.min_rank
    if p.cfg.method == "tucker2":
        return (min(max(rank[0], lo), full[0]), min(max(rank[1], lo), full[1]))
    if p.cfg.method == "tt":
        return [min(max(r, lo), f) for r, f in zip(rank, full, strict=True)]
    return min(max(rank, lo), full[0]) if p.cfg.method != "cp" else max(rank, lo)


def _ladder(p: _Plan) -> list[Rank]:
    """Candidate ranks in increasing cost order (for fractions and budgets)."""
    method, full = p.cfg.method, _full_rank(p)
    if method in ("svd", "separable"):
        return list(range(1, full[0] + 1))
    if method == "cp":
        n, c, kh, kw = p.module.weight.shape
        top = max(1, (n * c * kh * kw) // (n + c + kh + kw) + 1)  # beyond this: no saving
        return list(range(1, top + 1))
    if method == "tucker2":
        steps = max(full)
        return [
            (max(1, round(k * full[0] / steps)), max(1, round(k * full[1] / steps)))
            for k in range(1, steps + 1)
        ]
    steps = max(full) if full else 1
    return [[max(1, min(f, k)) for f in full] for k in range(1, steps + 1)]


def _spectrum(p: _Plan, key: str) -> torch.Tensor:
    if key not in p.spectra:
        w = p.module.weight.detach().double()
        if key == "matrix":
            mat = w.reshape(w.shape[0], -1) if p.cfg.method == "svd" else separable_matrix(w)
            p.spectra[key] = torch.linalg.svdvals(mat)
        else:  # tucker2 unfoldings
            mode = 0 if key == "mode0" else 1
            p.spectra[key] = torch.linalg.svdvals(w.movedim(mode, 0).reshape(w.shape[mode], -1))
    return p.spectra[key]


def _rank_for_energy(p: _Plan, energy: float) -> Rank:
    if p.cfg.method == "tucker2":
        return (
            rank_for_energy(_spectrum(p, "mode0"), energy),
            rank_for_energy(_spectrum(p, "mode1"), energy),
        )
    return rank_for_energy(_spectrum(p, "matrix"), energy)


def _rank_for_fraction(p: _Plan, fraction: float) -> Rank:
    budget = fraction * _orig_cost(p)[0]
    ladder = _ladder(p)
    best = ladder[0]
    for r in ladder:
        if _cost(p, r)[0] <= budget:
            best = r
        else:
            break
    return best


def _choose_rank(p: _Plan, knob: float | None = None) -> Rank:
    cfg = p.cfg
    if cfg.rank is not None:
        r = cfg.rank
        rank: Rank = (
            (r, r)
            if cfg.method == "tucker2"
            else [r] * len(_full_rank(p))
            if (cfg.method == "tt")
            else r
        )
    elif cfg.rank_fraction is not None:
        rank = _rank_for_fraction(p, cfg.rank_fraction)
    elif cfg.energy is not None:
        rank = _rank_for_energy(p, cfg.energy)
    elif cfg.vbmf:
        if cfg.method == "tucker2":
            rank = tucker2_vbmf_ranks(p.module.weight)
        else:
            w = p.module.weight.detach()
            rank = evbmf(
                w.reshape(w.shape[0], -1) if cfg.method == "svd" else separable_matrix(w)
            ).rank
    else:  # budget: global knob
        assert knob is not None
        rank = _rank_for_energy(p, knob) if cfg.method in _SPECTRAL else _rank_for_fraction(p, knob)
    return _clamp(p, rank)


def _helps(p: _Plan, rank: Rank) -> tuple[bool, tuple[int, int | None]]:
    before, after = _orig_cost(p), _cost(p, rank)
    ok = after[0] < before[0] and (
        not p.cfg.require_fewer_macs
        or after[1] is None
        or before[1] is None
        or after[1] < before[1]
    )
    return ok, after


def _build(p: _Plan, rank: Rank) -> nn.Module:
    m, cfg = p.module, p.cfg
    if cfg.method == "svd":
        return svd_conv1x1(m, rank) if isinstance(m, nn.Conv2d) else svd_linear(m, rank)
    if cfg.method == "tucker2":
        return tucker2_conv(m, rank)  # keeps a conv subclass as its core
    pad = None
    if p.form is not None:  # a conv subclass: its padding before plain factors
        m, pad = _plain_conv(m, p.form), nn.ZeroPad2d(p.form.pad)
    if cfg.method == "separable":
        block = separable_conv(m, rank)
    elif cfg.method == "cp":
        block = cp_conv(m, rank, n_iter_max=cfg.cp_iters, seed=cfg.seed)
    elif isinstance(m, nn.Conv2d):
        block = tt_conv(m, *p.tt_modes, rank)
    else:
        block = tt_linear(m, *p.tt_modes, rank)
    if pad is None:
        return block
    parts = list(block) if isinstance(block, nn.Sequential) else [block]
    return nn.Sequential(pad, *parts)


def _record_geometry(model: nn.Module, plans: list[_Plan], input_shape: tuple[int, ...]) -> None:
    by_module = {id(p.module): p for p in plans}
    hooks = []

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        p = by_module[id(mod)]
        x = inputs[0]
        p.in_shape = tuple(x.shape[1:])
        if isinstance(mod, nn.Conv2d):
            p.in_hw, p.out_hw = tuple(x.shape[-2:]), tuple(output.shape[-2:])
        else:
            p.positions = output.numel() // output.shape[-1]

    for p in plans:
        hooks.append(p.module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def _tt_modes(p: _Plan) -> tuple[list[int], list[int]]:
    """TT modes of the layer's (in x out) matrix; for a conv, in = k_h k_w C (patches)."""
    cfg, m = p.cfg, p.module
    conv = isinstance(m, nn.Conv2d)
    n_in = m.weight[0].numel() if conv else m.in_features
    n_out = m.out_channels if conv else m.out_features
    if cfg.tt_in_modes is not None:
        ins, outs = list(cfg.tt_in_modes), list(cfg.tt_out_modes)
        if math.prod(ins) != n_in or math.prod(outs) != n_out:
            what = "k_h * k_w * in_channels" if conv else "in_features"
            raise _err(
                "tt_in_modes/tt_out_modes",
                (ins, outs),
                f"products must equal {what}={n_in} and out={n_out}",
                p.name,
            )
        return ins, outs
    if conv:  # the spatial mode k_h k_w (output mode 1) first, as Garipov et al. 2016
        spatial = m.kernel_size[0] * m.kernel_size[1]
        ins = [spatial, *factorize(m.in_channels, cfg.tt_cores - 1)]
        return ins, [1, *factorize(n_out, cfg.tt_cores - 1)]
    return factorize(n_in, cfg.tt_cores), factorize(n_out, cfg.tt_cores)


def _rel_error(old: nn.Module, new: nn.Module, p: _Plan) -> float | None:
    """Relative output error ``||new(x) - old(x)|| / ||old(x) - bias||`` on a random probe."""
    shape = p.in_shape or ((old.in_features,) if isinstance(old, nn.Linear) else None)
    if shape is None:
        return None
    w = old.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=g, dtype=torch.float32).to(w.device, w.dtype)
    with torch.no_grad():
        ref, got = old(x), new(x)
        if old.bias is not None:
            shape_b = (-1,) + (1,) * (ref.dim() - 2) if isinstance(old, nn.Conv2d) else (-1,)
            signal = ref - old.bias.reshape(shape_b)
        else:
            signal = ref
        return float((got - ref).norm() / signal.norm().clamp_min(1e-30))
