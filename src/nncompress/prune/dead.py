"""Dead-neuron removal after connection pruning (Han et al. 2015, section 3.4).

"Neurons with zero input connections or zero output connections may be safely pruned."
A neuron is an output channel ``j`` of a Linear/Conv layer P (the *producer*) that feeds a
single Linear/Conv layer C (the *consumer*) through a chain of channel-wise operations
(ReLU/ReLU6, Dropout, Identity, max/avg pooling, BatchNorm, flatten into a Linear).

- *No output connections*: C's input columns for channel ``j`` are all zero. Whatever P
  computes for ``j`` is multiplied by zero, so ``j`` is removed from P, from a BatchNorm on the
  chain and from C's inputs. The model's output is unchanged.
- *No input connections*: P's weights for ``j`` are all zero, so ``j`` outputs the constant
  ``b_j`` (its bias, 0 without one) and after the activation ``c = act(b_j)``. That is not dead
  when ``c != 0``: relu(bias) still reaches C. We fold it, as Han's "remove" implies for an
  exact model: C's bias gets ``sum_k W_C[:, j, k] * c`` (over the kernel / flattened positions)
  and the columns become zero, then ``j`` is removed as above. Folding is exact only when the
  chain has no BatchNorm and C has no padding (a padded border sees zeros, not ``c``) and a bias
  (or ``c == 0``); otherwise such a channel is left in place (reported as ``skipped``).

Which layer feeds which is read from a ``torch.fx`` trace of the model; a producer whose output
is used by more than one operation (residual additions, concatenations) is not touched here —
filter pruning's dependency graph handles those. The removal itself is done by
:func:`nncompress.prune.thin.remove_channels_` (filter pruning's physical thinning, which also
slices the BatchNorm between and the consumer's inputs); the result is checked against the
original model on an example input before it is accepted.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from ..core.errors import NncompressError
from ..core.fx import op_kind, op_name, trace
from ..core.modules import folded_copy
from .magnitude import masks_from_zeros_, pruning_masks, remove_pruning_
from .thin import remove_channels_

__all__ = ["DeadNeuronError", "Edge", "find_dead_neurons", "neuron_edges", "remove_dead_neurons_"]

log = logging.getLogger(__name__)

_LAYER = (nn.Linear, nn.Conv1d, nn.Conv2d)
# op kinds (nncompress.core.fx.op_kind) a neuron passes through unchanged, channel by channel
_PASS_KINDS = ("dropout", "identity", "maxpool", "avgpool", "flatten", "reshape")


class DeadNeuronError(NncompressError, RuntimeError):
    """Removing the detected neurons changed the model's output (should never happen)."""


@dataclass
class Edge:
    """A producer layer feeding exactly one consumer layer through channel-wise operations."""

    producer: str
    consumer: str
    act: str = "none"  # 'none' | 'relu' | 'relu6'
    batchnorm: str | None = None
    flatten: bool = False
    foldable: bool = True  # the constant of an input-dead neuron can be folded exactly
    ops: list[str] = field(default_factory=list)


def _step(edge: Edge, cur: torch.fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Record the channel-wise op ``cur`` on ``edge``; ``False`` if the chain cannot pass it."""
    kind = op_kind(cur, mods)
    m = mods.get(cur.target) if cur.op == "call_module" else None
    if kind in ("relu", "relu6"):
        edge.act = kind if edge.act == "none" else "mixed"
    elif kind == "batchnorm" and cur.op == "call_module":
        if edge.batchnorm is not None:
            return False
        edge.batchnorm = cur.target
        edge.foldable = False
    elif kind in _PASS_KINDS:
        if kind in ("flatten", "reshape"):
            edge.flatten = True
        if kind == "avgpool" and (m is None or m.padding not in (0, (0, 0))):
            edge.foldable = False  # a padded average sees zeros, not the constant
    else:
        return False
    edge.ops.append(type(m).__name__ if m is not None else op_name(cur).rpartition(".")[2])
    return True


def neuron_edges(model: nn.Module) -> dict[str, Edge]:
    """``{producer_name: Edge}`` for every simple producer -> consumer chain in ``model``."""
    gm = trace(folded_copy(model))
    mods = dict(gm.named_modules())
    edges: dict[str, Edge] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _LAYER):
            continue
        consumer = mods[node.target]
        edge = Edge(producer="", consumer=node.target)
        cur = node.args[0] if node.args else None
        ok = isinstance(cur, torch.fx.Node)
        while ok:
            if len(cur.users) != 1:
                ok = False
                break
            if cur.op == "call_module" and isinstance(mods.get(cur.target), _LAYER):
                edge.producer = cur.target
                break
            if not _step(edge, cur, mods):
                ok = False
                break
            nxt = [a for a in cur.args if isinstance(a, torch.fx.Node)]
            if len(nxt) != 1:
                ok = False
                break
            cur = nxt[0]
        if not ok or not edge.producer or edge.act == "mixed":
            continue
        prod = mods[edge.producer]
        if not _shapes_fit(prod, consumer, edge):
            continue
        if isinstance(consumer, nn.Conv1d | nn.Conv2d):
            pad = consumer.padding
            if pad == "same" or (not isinstance(pad, str) and any(p != 0 for p in pad)):
                edge.foldable = False
        edges[edge.producer] = edge
    return edges


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _shapes_fit(prod: nn.Module, cons: nn.Module, edge: Edge) -> bool:
    c = _out_channels(prod)
    if isinstance(prod, nn.Conv1d | nn.Conv2d) and prod.groups != 1:
        return False
    if isinstance(cons, nn.Conv1d | nn.Conv2d):
        return cons.groups == 1 and cons.in_channels == c and not edge.flatten
    # consumer is Linear
    if isinstance(prod, nn.Linear):
        return cons.in_features == c
    return edge.flatten and cons.in_features % c == 0


def _columns(cons: nn.Module, prod_channels: int) -> torch.Tensor:
    """Consumer weight viewed as ``(out, C_prod, positions)``."""
    w = cons.weight.detach()
    return w.reshape(w.shape[0], prod_channels, -1)  # (out, C_prod, k*k or spatial)


def find_dead_neurons(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """Dead neurons per producer layer: ``{layer: {"no_output": [...], "no_input": [...],
    "skipped": [...]}}`` (``skipped``: zero input weights but a nonzero constant output that
    cannot be folded exactly; those are kept)."""
    mods = dict(model.named_modules())
    out: dict[str, dict[str, list[int]]] = {}
    for pname, edge in neuron_edges(model).items():
        prod, cons = mods[pname], mods[edge.consumer]
        c = _out_channels(prod)
        cols = _columns(cons, c)  # (out, C, k)
        no_output = (cols == 0).all(dim=2).all(dim=0)  # (C,)
        w = prod.weight.detach().reshape(c, -1)  # (C, fan_in)
        no_input = (w == 0).all(dim=1) & ~no_output  # (C,)
        consts = _constants(prod, edge, mods)
        skipped = (
            no_input
            & (consts != 0)
            & torch.tensor([not (edge.foldable and cons.bias is not None)] * c)
        )
        res = {
            "no_output": no_output.nonzero().flatten().tolist(),
            "no_input": (no_input & ~skipped).nonzero().flatten().tolist(),
            "skipped": skipped.nonzero().flatten().tolist(),
        }
        if any(res.values()):
            out[pname] = res
    return out


def _constants(prod: nn.Module, edge: Edge, mods: dict[str, nn.Module]) -> torch.Tensor:
    """Constant output per channel of an input-dead neuron after the chain's activation."""
    c = _out_channels(prod)
    b = prod.bias.detach().clone() if prod.bias is not None else torch.zeros(c)  # (C,)
    if edge.batchnorm is not None:
        bn = mods[edge.batchnorm]
        if bn.running_mean is not None:
            scale = (bn.weight.detach() if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
            b = (b - bn.running_mean) * scale + (bn.bias.detach() if bn.affine else 0.0)
    if edge.act == "relu":
        b = b.clamp(min=0)
    elif edge.act == "relu6":
        b = b.clamp(0, 6)
    return b  # (C,)


@torch.no_grad()
def remove_dead_neurons_(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    max_rounds: int = 5,
) -> dict[str, Any]:
    """Physically remove dead neurons (see the module docstring) from ``model``, in place.

    Pruning masks are folded first and re-created from the zeros afterwards (only on layers
    that had masks). The output on ``example_input`` is compared with the original model's
    (``atol``/``rtol``); on mismatch the model is left unchanged and :class:`DeadNeuronError`
    is raised. Returns ``{"layers": {name: {"before", "after", "no_output", "no_input",
    "skipped"}}, "params_before", "params_after"}``; removed submodules are replaced by smaller
    standard ones, which ``save_checkpoint`` records as replacements.
    """
    was_training = model.training
    model.eval()
    reference = model(example_input)
    had_masks = set(pruning_masks(model))
    backup = copy.deepcopy(model)
    params_before = sum(p.numel() for p in model.parameters())
    remove_pruning_(model)
    report: dict[str, dict[str, Any]] = {}
    try:
        # one producer at a time, re-reading the graph after each change (slicing a consumer
        # replaces a module that may itself be the producer of the next edge)
        stuck: set[str] = set()  # single-channel layers whose last channel is dead
        for _ in range(max_rounds * max(1, len(list(model.modules())))):
            dead = find_dead_neurons(model)
            todo = [
                (n, d)
                for n, d in dead.items()
                if (d["no_output"] or d["no_input"]) and n not in stuck
            ]
            for n, d in dead.items():
                if n in report:
                    report[n]["skipped"] = d["skipped"]
                elif d["skipped"]:
                    report[n] = {
                        "before": _out_channels(model.get_submodule(n)),
                        "no_output": 0,
                        "no_input": 0,
                        "skipped": d["skipped"],
                    }
            if not todo:
                break
            pname, d = todo[0]
            edge = neuron_edges(model)[pname]
            mods = dict(model.named_modules())
            prod, cons = mods[pname], mods[edge.consumer]
            c = _out_channels(prod)
            entry = report.setdefault(
                pname, {"before": c, "no_output": 0, "no_input": 0, "skipped": d["skipped"]}
            )
            drop = set(d["no_output"]) | set(d["no_input"])
            if c == 1:
                stuck.add(pname)
                continue
            if d["no_input"]:
                consts = _constants(prod, edge, mods)  # (C,)
                idx = torch.tensor(d["no_input"])
                cols = _columns(cons, c)  # (out, C, k)
                if cons.bias is not None:
                    # fold the constant outputs c_j into the consumer's bias
                    cons.bias += (cols[:, idx].sum(dim=2) * consts[idx]).sum(dim=1)  # (out,)
            if len(drop) == c:
                # keep one channel so that shapes stay valid; it no longer reaches the consumer
                drop.discard(0)
                _columns(cons, c)[:, 0] = 0  # view of cons.weight
            # the filter-pruning dependency graph removes the channel from the producer, the
            # BatchNorm after it and the consumer's inputs (H*W features after a flatten)
            remove_channels_(model, {pname: sorted(drop)}, example_input)
            entry["no_output"] += len(d["no_output"])
            entry["no_input"] += len(d["no_input"])
        for name in report:
            report[name]["after"] = _out_channels(model.get_submodule(name))
        result = model(example_input)
        if not torch.allclose(result, reference, atol=atol, rtol=rtol):
            err = float((result - reference).abs().max())
            raise DeadNeuronError(
                f"removing dead neurons changed the output (max abs diff {err:.3g})"
            )
    except BaseException:
        # restore the original modules and masks
        for name, child in backup.named_children():
            setattr(model, name, child)
        model.train(was_training)
        raise
    if had_masks:
        masks_from_zeros_(model, filter=lambda n, m: n in had_masks)
    model.train(was_training)
    params_after = sum(p.numel() for p in model.parameters())
    log.info("dead neurons removed: %s; params %d -> %d", report, params_before, params_after)
    return {"layers": report, "params_before": params_before, "params_after": params_after}
