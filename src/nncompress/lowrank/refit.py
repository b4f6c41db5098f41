"""Data-aware refit of decomposed layers: least squares on real activations.

Weight-space decompositions (SVD, Tucker-2, CP) minimise ``||W - W_hat||`` per layer, which
ignores the data and lets errors pile up through a deep network. Zhang, Zou, He and Sun
("Accelerating very deep convolutional networks for classification and detection", TPAMI 2016)
minimise instead the error of each layer's *response* on real inputs, and their "asymmetric"
variant takes the input from the already-approximated network and the target from the
original one, so that each layer also corrects the error accumulated upstream.

:func:`refit_` does this for the part of a decomposed block that is linear given its input: the
last factor (the final 1x1 convolution of Tucker-2/CP, the second Linear of SVD, the 1 x k
convolution of the separable pair). Layers are taken in forward order; for each, the input of
its last factor is recorded from the current (decomposed, already refitted upstream) model and
the target is the original layer's output in ``reference`` on the same images, then

    W_last = argmin ||Z W^T - Y||^2 + lambda ||W||^2

is solved in closed form from the accumulated Gram matrices (float64). Only that factor changes;
it is replaced only where the refit lowers the measured error on the calibration data.

The closed-form solve is a few lines of ``torch.linalg.solve`` on a small (rank x rank) system:
no library offers "least squares of one layer's response through PyTorch hooks", so it is
written here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.train import ProgressEvent

__all__ = ["RefitResult", "refit_"]

log = logging.getLogger(__name__)


@dataclass
class RefitResult:
    """Per layer: relative response error before and after the refit, on the calibration data.

    ``error = ||Y_hat - Y||_F / ||Y||_F`` with ``Y`` the original layer's output in the reference
    model and ``Y_hat`` the decomposed block's output in the refitted model, both on the
    calibration images. ``applied`` is False where the solve did not lower the error (the
    factor is then left as it was).
    """

    name: str
    error_before: float
    error_after: float
    applied: bool
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """Raised by a forward hook once it has what it needs (saves the rest of the forward)."""


def _last_factor(block: nn.Module) -> nn.Module | None:
    if not isinstance(block, nn.Sequential) or len(block) < 2:
        return None
    last = block[-1]
    if isinstance(last, nn.Linear) or (isinstance(last, nn.Conv2d) and last.groups == 1):
        return last
    return None


def _rows(mod: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The last factor's input as rows of a design matrix: (samples, in_features)."""
    if isinstance(mod, nn.Linear):
        return z.reshape(-1, z.shape[-1])
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        # F.unfold pads with zeros only; pad explicitly for other modes
        raise ValueError(f"refit: {mod} has padding {mod.padding!r}/{mod.padding_mode}")
    cols = F.unfold(z, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Layer outputs as rows: (samples, out_features)."""
    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _capture(
    model: nn.Module, module: nn.Module, x: torch.Tensor, want: str
) -> torch.Tensor | None:
    """Run ``model(x)`` until ``module`` is reached and return its input or output."""
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        got.append(inputs[0] if want == "input" else output)
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


def refit_(
    model: nn.Module,
    reference: nn.Module,
    loader: Iterable,
    names: Sequence[str],
    *,
    batches: int = 8,
    ridge: float = 1e-4,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> list[RefitResult]:
    """Refit the last factor of each decomposed block to the original layer's response.

    Parameters
    ----------
    model : the decomposed network, changed in place (its ``training`` flag is restored).
    reference : the network before decomposition (not changed); ``reference.get_submodule(n)``
        must be the original layer of each block ``n``.
    loader : calibration batches ``(x, y)`` (labels unused), e.g. training images without
        augmentation; the first ``batches`` are used.
    names : the decomposed blocks to refit, e.g. ``report.decomposed`` from
        :func:`~nncompress.lowrank.decompose_`; refitted in the model's forward order. Blocks
        whose last factor is not a Linear or ungrouped Conv2d (TT) are skipped.
    batches : number of calibration batches (>= 1).
    ridge : Tikhonov weight, relative to the mean diagonal of the Gram matrix (>= 0).
    progress : receives :class:`~nncompress.engine.ProgressEvent` per layer.

    Returns
    -------
    list[RefitResult]
        One entry per refitted block, in forward order.
    """
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ValueError(f"batches={batches!r}: must be an integer >= 1")
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge!r}: must be >= 0")
    modules = dict(model.named_modules())
    ref_modules = dict(reference.named_modules())
    for n in names:
        if n not in modules:
            raise ValueError(f"names: '{n}' is not a submodule of the model")
        if n not in ref_modules:
            raise ValueError(f"names: '{n}' is not a submodule of the reference model")
    order = {n: i for i, n in enumerate(modules)}
    todo = [n for n in sorted(set(names), key=order.__getitem__) if _last_factor(modules[n])]
    data: list[torch.Tensor] = []
    for x, *_ in loader:
        data.append(x)
        if len(data) >= batches:
            break
    if not data:
        raise ValueError("loader: no calibration batches")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training, ref_training = model.training, reference.training
    model.eval()
    reference.eval()
    results: list[RefitResult] = []
    if progress:
        progress(ProgressEvent("start", "refit", total=len(todo)))
    try:
        with torch.no_grad():
            for i, name in enumerate(todo):
                results.append(
                    _refit_one(
                        model,
                        reference,
                        modules[name],
                        ref_modules[name],
                        name,
                        data,
                        device,
                        ridge,
                    )
                )
                if progress:
                    progress(
                        ProgressEvent(
                            "advance",
                            "refit",
                            total=len(todo),
                            completed=i + 1,
                            info={"layer": name},
                        )
                    )
    finally:
        model.train(was_training)
        reference.train(ref_training)
        if progress:
            progress(ProgressEvent("end", "refit"))
    return results


def _refit_one(
    model: nn.Module,
    reference: nn.Module,
    block: nn.Sequential,
    original: nn.Module,
    name: str,
    data: list[torch.Tensor],
    device: torch.device,
    ridge: float,
) -> RefitResult:
    last = _last_factor(block)
    assert last is not None
    bias = last.bias is not None
    gram = zty = None
    yy = 0.0
    samples = 0
    for x in data:
        x = x.to(device)
        y = _capture(reference, original, x, "output")  # original response
        z = _capture(model, last, x, "input")  # input of the last factor, upstream refitted
        if y is None or z is None:
            raise ValueError(f"refit: layer '{name}' is not reached by the model's forward")
        rows, tgt = _rows(last, z).double(), _targets(last, y).double()
        if bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        gram = rows.T @ rows if gram is None else gram + rows.T @ rows
        zty = rows.T @ tgt if zty is None else zty + rows.T @ tgt
        yy += float((tgt * tgt).sum())
        samples += rows.shape[0]
    assert gram is not None and zty is not None
    d = gram.shape[0]
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    sol = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device), zty)
    w_old = _flat_weight(last).double()  # (in, out) incl. bias row

    # ||Z W - Y||^2 = tr(W^T G W) - 2 tr(W^T Z^T Y) + ||Y||^2, exact from the accumulated sums
    def err(w: torch.Tensor) -> float:
        sq = float((w * (gram @ w)).sum() - 2.0 * (w * zty).sum()) + yy
        return max(sq, 0.0) ** 0.5 / max(yy, 1e-300) ** 0.5

    before, after = err(w_old), err(sol)
    applied = after < before
    if applied:
        _set_flat_weight(last, sol.to(last.weight.dtype))
    log.info(
        "refit %s: response error %.4f -> %.4f%s",
        name,
        before,
        after,
        "" if applied else " (kept the old factor)",
    )
    return RefitResult(name, before, after if applied else before, applied, samples)


def _flat_weight(mod: nn.Module) -> torch.Tensor:
    """The factor as the (in_features [+ 1 bias row], out_features) matrix of the solve."""
    w = mod.weight.detach().reshape(mod.weight.shape[0], -1).T  # (in, out)
    if mod.bias is not None:
        w = torch.cat([w, mod.bias.detach()[None, :]], dim=0)
    return w


def _set_flat_weight(mod: nn.Module, w: torch.Tensor) -> None:
    n_in = mod.weight[0].numel()
    mod.weight.copy_(w[:n_in].T.reshape(mod.weight.shape))
    if mod.bias is not None:
        mod.bias.copy_(w[n_in])
