"""Data-aware refit of decomposed layers: least squares on real activations.

Weight-space decompositions (SVD, Tucker-2, CP) minimise ``||W - W_hat||`` per layer, which
ignores the data and lets errors pile up through a deep network. Zhang, Zou, He and Sun
("Accelerating very deep convolutional networks for classification and detection", TPAMI 2016)
minimise instead the error of each layer's *response* on real inputs, and their "asymmetric"
variant takes the input from the already-approximated network and the target from the
original one, so that each layer also corrects the error accumulated upstream.

:func:`refit_` does this for the factors of a block that are linear given their input. Layers
are taken in forward order; for each, the input of the refitted factors is recorded from the
current (decomposed, already refitted upstream) model and the target is the original layer's
output in ``reference`` on the same images. The last factor (the final 1x1 convolution of
Tucker-2/CP, the second Linear of SVD, the 1 x k convolution of the separable pair) is

    W_last = argmin ||Z W^T - Y||^2 + lambda ||W||^2,

solved in closed form from the accumulated Gram matrices (float64). When the last factor is
pointwise (a matrix ``U`` and bias ``b`` per position) and the factor before it is an ordinary
convolution or Linear (the Tucker-2 core, the first SVD factor), that factor is refitted
first, to the targets ``pinv(U) (Y - b)``, and the last one after it. The candidate with the
lowest response error on the calibration data is kept (the untouched factors included).

The closed-form solve is a few lines of ``torch.linalg.solve`` on a small (rank x rank) system:
no library offers "least squares of one layer's response through PyTorch hooks", so it is
written here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.convs import is_conv_subclass
from ..core.modules import model_device
from ..core.progress import Progress, progress_task
from ..engine.batches import run_model, take_batches, to_device

__all__ = ["RefitResult", "refit_"]

log = logging.getLogger(__name__)


@dataclass
class RefitResult:
    """Per layer: relative response error before and after the refit, on the calibration data.

    ``error = ||Y_hat - Y||_F / ||Y||_F`` with ``Y`` the original layer's output in the reference
    model and ``Y_hat`` the decomposed block's output in the refitted model, both on the
    calibration images. ``applied`` is False where the solve did not lower the error (the
    factors are then left as they were).
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


def _solvable(mod: nn.Module) -> bool:
    """A Linear, or a Conv2d whose input patches F.unfold reproduces (no groups, zero padding)."""
    if isinstance(mod, nn.Linear):
        return True
    return (
        isinstance(mod, nn.Conv2d)
        and not is_conv_subclass(mod)  # its forward pads beyond what F.unfold would
        and mod.groups == 1
        and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    )


def _last_factor(block: nn.Module) -> nn.Module | None:
    if not isinstance(block, nn.Sequential) or len(block) < 2:
        return None
    return block[-1] if _solvable(block[-1]) else None


def _rows(mod: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """A factor's input as rows of a design matrix: (samples, in_features)."""
    if isinstance(mod, nn.Linear):
        return z.reshape(-1, z.shape[-1])
    cols = F.unfold(z, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Layer outputs as rows: (samples, out_features)."""
    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _capture(model: nn.Module, module: nn.Module, x: Any, want: str) -> torch.Tensor | None:
    """Run ``model`` on batch ``x`` until ``module`` is reached; return its input or output."""
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        got.append(inputs[0] if want == "input" else output)
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        run_model(model, x)
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
    progress: Progress | None = None,
) -> list[RefitResult]:
    """Refit the last factors of each decomposed block to the original layer's response.

    Parameters
    ----------
    model : the decomposed network, changed in place (its ``training`` flag is restored).
    reference : the network before decomposition (not changed); ``reference.get_submodule(n)``
        must be the original layer of each block ``n``.
    loader : calibration batches: ``(x, y)`` tuples (labels unused), tensors or dicts of
        keyword arguments (``model(**batch)``), e.g. training images without augmentation;
        the first ``batches`` are used.
    names : the decomposed blocks to refit, e.g. ``report.decomposed`` from
        :func:`~nncompress.lowrank.decompose_`; refitted in the model's forward order. Blocks
        whose last factor is not a Linear or an ungrouped zero-padded Conv2d (TT) are skipped.
        Only the last factor, and the one before it where the last is pointwise, change.
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
    data = take_batches(loader, batches, "loader")
    device = model_device(model)
    was_training, ref_training = model.training, reference.training
    model.eval()
    reference.eval()
    results: list[RefitResult] = []
    with progress_task(progress, "refit", len(todo)) as task, torch.no_grad():
        try:
            for name in todo:
                r = _refit_one(
                    model, reference, modules[name], ref_modules[name], name, data, device, ridge
                )
                results.append(r)
                task.advance(layer=name)
        finally:
            model.train(was_training)
            reference.train(ref_training)
    return results


def _pointwise(mod: nn.Module) -> bool:
    """A Linear, or a 1x1 stride-1 unpadded ungrouped Conv2d: a matrix applied per position."""
    return _solvable(mod) and (
        isinstance(mod, nn.Linear)
        or (mod.kernel_size, mod.stride, mod.padding) == ((1, 1), (1, 1), (0, 0))
    )


def _core_factor(block: nn.Sequential) -> nn.Module | None:
    """The factor before a pointwise last factor, when it is a Linear or ungrouped Conv2d."""
    if len(block) < 2 or not _pointwise(block[-1]):
        return None
    return block[-2] if _solvable(block[-2]) else None


def _solve(
    mod: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], ridge: float
) -> torch.Tensor:
    """Ridge least squares for ``mod``'s weight (and bias): rows of ``mod``'s inputs -> targets.

    ``targets`` are already rows (samples, out_features). Returns the (in [+1], out) solution.
    """
    gram = cross = None
    for z, tgt in zip(inputs, targets, strict=True):
        rows = _rows(mod, z).double()  # (S, in)
        if mod.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        gram = rows.T @ rows if gram is None else gram + rows.T @ rows  # (in, in)
        cross = rows.T @ tgt if cross is None else cross + rows.T @ tgt  # (in, out)
    assert gram is not None and cross is not None
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross)


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
    last, core = _last_factor(block), _core_factor(block)
    assert last is not None
    chain = block[-2:] if core is not None else block[-1:]
    zs: list[torch.Tensor] = []  # inputs of the refitted part, from the decomposed model
    ys: list[torch.Tensor] = []  # the original layer's responses
    for x in data:
        x = to_device(x, device)
        y = _capture(reference, original, x, "output")
        z = _capture(model, chain[0], x, "input")
        if y is None or z is None:
            raise ValueError(f"refit: layer '{name}' is not reached by the model's forward")
        zs.append(z)
        ys.append(y)
    y_rows = [_targets(last, y).double() for y in ys]  # (S, N) each
    yy = sum(float((t * t).sum()) for t in y_rows)

    def error() -> float:
        sq = sum(float(((chain(z) - y) ** 2).sum()) for z, y in zip(zs, ys, strict=True))
        return (sq / max(yy, 1e-300)) ** 0.5

    def fit_last() -> None:
        mids = [chain[:-1](z) for z in zs] if core is not None else zs
        _set_flat_weight(last, _solve(last, mids, y_rows, ridge).to(last.weight.dtype))

    old = [p.detach().clone() for p in chain.parameters()]
    before = error()
    fit_last()  # candidate 1: the last factor only
    best, best_state = before, old
    if (e := error()) < best:
        best, best_state = e, [p.detach().clone() for p in chain.parameters()]
    if core is not None:
        # candidate 2: the factor before it too. With U the last factor's matrix and b its bias,
        # min ||U core(z) + b - y|| over the core's weights is the least squares fit of
        # core(z) to pinv(U) (y - b) (U has full column rank), then the last factor again.
        for p, v in zip(chain.parameters(), old, strict=True):
            p.copy_(v)
        u = last.weight.detach().reshape(last.weight.shape[0], -1).double()  # (N, R)
        b = last.bias.detach().double() if last.bias is not None else 0.0
        u_pinv_t = torch.linalg.pinv(u).T  # (N, R)
        t_rows = [(t - b) @ u_pinv_t for t in y_rows]  # (S, R) each
        _set_flat_weight(core, _solve(core, zs, t_rows, ridge).to(core.weight.dtype))
        fit_last()
        if (e := error()) < best:
            best, best_state = e, [p.detach().clone() for p in chain.parameters()]
    for p, v in zip(chain.parameters(), best_state, strict=True):
        p.copy_(v)
    applied = best < before
    log.info(
        "refit %s: response error %.4f -> %.4f%s",
        name,
        before,
        best,
        "" if applied else " (kept the old factors)",
    )
    return RefitResult(name, before, best, applied, sum(t.shape[0] for t in y_rows))


def _set_flat_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Write the (in_features [+ 1 bias row], out_features) solution into the factor."""
    n_in = mod.weight[0].numel()
    mod.weight.copy_(w[:n_in].T.reshape(mod.weight.shape))
    if mod.bias is not None:
        mod.bias.copy_(w[n_in])
