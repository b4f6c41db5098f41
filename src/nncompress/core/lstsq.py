"""Ridge least squares of one layer's response, shared by the families that refit a layer to
the outputs of the original model (channel pruning's reconstruction, He et al., ICCV 2017;
the refit of low-rank factors): ``W = argmin ||Z W - Y||^2 + lam ||W||^2`` solved in closed
form from the Gram matrix ``Z^T Z`` (float64). No library fits "the response of one layer
inside a PyTorch model"; the solve itself is ``torch.linalg.solve``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ridge_solve", "set_layer_solution_", "with_bias_column"]


def with_bias_column(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(S, in)`` with a column of ones appended ``(S, in + 1)``: the bias's input."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + lam I)^-1 C`` for ``G = Z^T Z`` ``(in, in)`` and ``C = Z^T Y`` ``(in, out)``, with
    ``lam = ridge * mean(diag G) + 1e-12`` (Tikhonov weight relative to the data's scale).
    Returns the ``(in, out)`` solution."""
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross)


@torch.no_grad()
def set_layer_solution_(mod: nn.Module, sol: torch.Tensor) -> None:
    """Write an ``(in_features [+ 1 bias row], out_features)`` solution into a Linear / Conv2d
    (weight flattened as ``(out, in)``), each part cast to its parameter's dtype."""
    n_in = mod.weight[0].numel()
    mod.weight.copy_(sol[:n_in].T.reshape(mod.weight.shape).to(mod.weight.dtype))
    if mod.bias is not None:
        mod.bias.copy_(sol[n_in].to(mod.bias.dtype))
