"""Least-squares reconstruction of the layers that read pruned channels.

He, Zhang and Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV 2017),
and AMC (He et al., ECCV 2018, section 3.2 "channel pruning"): after the input channels of a
layer are removed, its weights are refitted so that its response on real data is as close as
possible to the original layer's response:

    W' = argmin_W || Z W^T - Y ||_F^2 + lambda ||W||_F^2,

where ``Z`` holds the (pruned) layer's input patches at sampled output positions and ``Y``
the *original* model's output of that layer at the same positions. As AMC does, only a few
positions per calibration image are sampled (``points_per_image``): the targets are small
enough to compute once and reuse for every candidate pruning.

The inputs ``Z`` are taken from the pruned model itself, so a layer also corrects the error
accumulated upstream (the "asymmetric" reconstruction of Zhang et al., TPAMI 2016); all named
layers are refitted in one forward pass, each from a forward pre-hook that fits the weight
right before the layer runs.

:func:`nncompress.lowrank.refit_` solves the same problem for decomposed blocks; channel
pruning needs it for ordinary layers whose input width changed, and families do not import
each other, so this is its own small module (a ridge solve on a Gram matrix; no library fits
"the response of one layer inside a PyTorch model").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReconstructionData", "ReconstructionResult", "reconstruct_", "reconstruction_data"]

log = logging.getLogger(__name__)


def reconstructable(mod: nn.Module) -> bool:
    """A Linear, or a Conv2d without groups and with zero padding (patches are gathered)."""
    if isinstance(mod, nn.Linear):
        return True
    return (
        isinstance(mod, nn.Conv2d)
        and mod.groups == 1
        and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    )


@dataclass
class ReconstructionData:
    """Calibration images and, per layer, the original responses at sampled positions.

    Attributes
    ----------
    inputs : calibration images ``(B, ...)``.
    positions : per layer, ``(B, P)`` output positions (row-major over ``H_out * W_out``)
        sampled per image; ``None`` for a Linear on ``(B, in)`` inputs (one row per image).
    targets : per layer, ``(B * P, C_out)`` float64 responses of the original layer.
    """

    inputs: torch.Tensor
    positions: dict[str, torch.Tensor | None]
    targets: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> ReconstructionData:
        return ReconstructionData(
            self.inputs.to(device),
            {k: (None if v is None else v.to(device)) for k, v in self.positions.items()},
            {k: v.to(device) for k, v in self.targets.items()},
        )


@dataclass
class ReconstructionResult:
    """Relative response error ``||Z W^T - Y|| / ||Y||`` before and after the refit of a layer."""

    name: str
    error_before: float
    error_after: float
    applied: bool
    rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def _patches(mod: nn.Conv2d, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Input patches of ``mod`` at output positions ``pos``: ``(B * P, C * kh * kw)``.

    The same ordering as ``F.unfold`` (channel, then kernel row, then kernel column), but only
    at the sampled positions, so memory stays ``B * P * C * kh * kw``.
    """
    b, c, h, w = z.shape
    kh, kw = mod.kernel_size
    sh, sw = mod.stride
    dh, dw = mod.dilation
    ph, pw = mod.padding
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    zp = F.pad(z, (pw, pw, ph, ph))  # (B, C, H + 2ph, W + 2pw)
    oy, ox = pos // w_out, pos % w_out  # (B, P)
    iy = oy[..., None] * sh + torch.arange(kh, device=z.device) * dh  # (B, P, kh)
    ix = ox[..., None] * sw + torch.arange(kw, device=z.device) * dw  # (B, P, kw)
    bi = torch.arange(b, device=z.device)[:, None, None, None, None]
    ci = torch.arange(c, device=z.device)[None, None, :, None, None]
    out = zp[bi, ci, iy[:, :, None, :, None], ix[:, :, None, None, :]]  # (B, P, C, kh, kw)
    return out.reshape(-1, c * kh * kw)


def _rows(mod: nn.Module, z: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        rows = z.reshape(z.shape[0], -1, z.shape[-1])  # (B, T, in)
        if pos is not None:
            rows = rows.gather(1, pos[..., None].expand(-1, -1, z.shape[-1]))  # (B, P, in)
        return rows.reshape(-1, z.shape[-1])
    assert pos is not None
    return _patches(mod, z, pos)


def _response_rows(mod: nn.Module, y: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """A layer's output at the sampled positions: ``(B * P, C_out)``."""
    if isinstance(mod, nn.Linear):
        rows = y.reshape(y.shape[0], -1, y.shape[-1])  # (B, T, out)
        if pos is not None:
            rows = rows.gather(1, pos[..., None].expand(-1, -1, y.shape[-1]))
        return rows.reshape(-1, y.shape[-1])
    flat = y.flatten(2)  # (B, C_out, H_out * W_out)
    picked = flat.gather(2, pos[:, None, :].expand(-1, flat.shape[1], -1))  # (B, C_out, P)
    return picked.transpose(1, 2).reshape(-1, flat.shape[1])


@torch.no_grad()
def reconstruction_data(
    reference: nn.Module,
    inputs: torch.Tensor,
    names: Sequence[str],
    *,
    points_per_image: int = 16,
    seed: int = 0,
) -> ReconstructionData:
    """Run ``reference`` once on ``inputs`` and keep each named layer's response at
    ``points_per_image`` random output positions per image (fixed by ``seed``).

    Layers that are not :func:`reconstructable` are skipped (not an error: the caller may pass
    every layer that might lose input channels).
    """
    if not isinstance(points_per_image, int) or points_per_image < 1:
        raise ValueError(f"points_per_image={points_per_image!r}: must be an integer >= 1")
    modules = dict(reference.named_modules())
    for n in names:
        if n not in modules:
            raise ValueError(f"names: '{n}' is not a submodule of the reference model")
    want = [n for n in names if reconstructable(modules[n])]
    gen = torch.Generator().manual_seed(seed)
    positions: dict[str, torch.Tensor | None] = {}
    targets: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name in targets:  # a module called twice: keep the first call
                return
            if isinstance(mod, nn.Linear) and out.dim() == 2:
                pos = None
            else:
                n_pos = out[0, 0].numel() if isinstance(mod, nn.Conv2d) else out.shape[1]
                pos = torch.randint(0, n_pos, (out.shape[0], points_per_image), generator=gen).to(
                    out.device
                )  # (B, P)
            positions[name] = pos
            targets[name] = _response_rows(mod, out, pos).double()

        return fn

    for n in want:
        hooks.append(modules[n].register_forward_hook(hook(n)))
    was_training = reference.training
    reference.eval()
    try:
        reference(inputs)
    finally:
        reference.train(was_training)
        for h in hooks:
            h.remove()
    return ReconstructionData(inputs, positions, targets)


def _solve(rows: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares ``argmin ||rows X - targets||^2 + lam ||X||^2``, ``(in, out)``."""
    gram = rows.T @ rows  # (in, in)
    cross = rows.T @ targets  # (in, out)
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross)


@torch.no_grad()
def reconstruct_(
    model: nn.Module,
    data: ReconstructionData,
    names: Sequence[str],
    *,
    keep_out: Mapping[str, Sequence[int]] | None = None,
    ridge: float = 1e-4,
) -> list[ReconstructionResult]:
    """Refit the weights (and bias) of the named layers of ``model`` to the original responses.

    Parameters
    ----------
    model : the pruned network, changed in place (``training`` restored). The named layers may
        have fewer input channels than in the reference; their output width must be unchanged
        where they are refitted (a layer whose outputs were also pruned is skipped).
    data : :func:`reconstruction_data` of the unpruned reference for (at least) these layers.
    names : layers to refit; those without targets in ``data`` are skipped.
    keep_out : for layers that also lost output channels, the original output channels they
        kept (the targets are restricted to them); other layers must keep their output width.
    ridge : Tikhonov weight relative to the mean diagonal of the Gram matrix (>= 0).

    Returns
    -------
    list[ReconstructionResult] : one per refitted layer, in forward order. A layer keeps its
        old weights when the solve does not lower its response error.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge!r}: must be >= 0")
    modules = dict(model.named_modules())
    results: list[ReconstructionResult] = []
    hooks = []

    def pre_hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            if any(r.name == name for r in results):
                return
            y = data.targets[name]  # (S, C_out)
            if keep_out is not None and name in keep_out and keep_out[name] is not None:
                y = y[:, list(keep_out[name])]  # (S, C_out kept)
            if mod.weight.shape[0] != y.shape[1]:
                log.debug("reconstruct: '%s' lost output channels; skipped", name)
                return
            rows = _rows(mod, args[0], data.positions[name]).double()  # (S, in)
            w_old = mod.weight.detach().reshape(mod.weight.shape[0], -1).double()  # (out, in)
            if mod.bias is not None:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
                w_old = torch.cat([w_old, mod.bias.detach().double()[:, None]], dim=1)
            yy = float((y * y).sum()) or 1e-300
            before = (float(((rows @ w_old.T - y) ** 2).sum()) / yy) ** 0.5
            sol = _solve(rows, y, ridge)  # (in [+1], out)
            after = (float(((rows @ sol - y) ** 2).sum()) / yy) ** 0.5
            applied = after < before
            if applied:
                n_in = mod.weight[0].numel()
                mod.weight.copy_(sol[:n_in].T.reshape(mod.weight.shape).to(mod.weight.dtype))
                if mod.bias is not None:
                    mod.bias.copy_(sol[n_in].to(mod.bias.dtype))
            results.append(ReconstructionResult(name, before, after, applied, rows.shape[0]))

        return fn

    for n in names:
        if n not in modules:
            raise ValueError(f"names: '{n}' is not a submodule of the model")
        if n in data.targets and reconstructable(modules[n]):
            hooks.append(modules[n].register_forward_pre_hook(pre_hook(n)))
    was_training = model.training
    model.eval()
    try:
        if hooks:
            model(data.inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return results
