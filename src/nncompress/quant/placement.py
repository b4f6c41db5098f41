"""Where fake quantization goes in a traced model (the graph side of :func:`~.linear.prepare`).

Weights: a :class:`~.fakequant.WeightFakeQuant` parametrization on every quantized Conv/Linear
(``nn.Conv2d`` subclasses that pad in their own ``forward`` included: :mod:`nncompress.core.convs`
keeps them as module calls). Activations: an :class:`~.fakequant.ActivationQuantizer` on the
graph input and after every integer layer - after its activation when onnxruntime fuses that
activation into the integer kernel (ReLU, ReLU6, Hardtanh: a ``Relu``/``Clip`` before a
``QuantizeLinear`` whose range it contains is dropped), else on the layer's output and again
after the activation (SiLU, Hardswish, GELU, Sigmoid... run between a DequantizeLinear and a
QuantizeLinear, so each tensor is quantized once). Residual additions, products of quantized
tensors (squeeze-and-excitation gates) and average pools get a quantizer after them;
order-preserving ops (ReLU, max-pool, flatten, dropout: op kinds of
:func:`nncompress.core.fx.op_kind`) keep their input's grid. The ONNX export
(:mod:`nncompress.quant.onnx_export`) turns every quantizer into a QuantizeLinear /
DequantizeLinear pair at the same place.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn
from torch.nn.utils import parametrize

from ..core.fx import op_kind, trace
from .fakequant import WeightFakeQuant, make_activation_quantizer
from .observers import make_observer
from .qconfig import PTQConfig

__all__ = [
    "QUANT_LAYERS",
    "grid_source",
    "insert_activation_quantizers",
    "is_float_activation",
    "is_fused_activation",
    "keeps_grid",
    "quantize_weights_",
    "quantized_layers",
]

QUANT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)

# op kinds (nncompress.core.fx.op_kind) that map a quantized grid onto itself: order-preserving
# ops need no new quantizer after them
_GRID_KINDS = ("relu", "maxpool", "flatten", "reshape", "dropout", "identity")
_POOL_KINDS = ("avgpool", "adaptive_avgpool")
_MUL = (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def is_fused_activation(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """ReLU, ReLU6 and Hardtanh: clamps that onnxruntime drops before a QuantizeLinear whose
    range they contain, so the integer layer before them writes the clamped grid directly."""
    kind = op_kind(node, mods)
    if kind in ("relu", "relu6"):
        return True
    if node.op == "call_module":
        return isinstance(mods.get(str(node.target)), nn.Hardtanh)
    return node.op == "call_function" and node.target is F.hardtanh


def is_float_activation(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Other element-wise activations (SiLU, Hardswish, GELU, Sigmoid, ...): they run between
    a DequantizeLinear and a QuantizeLinear (or as onnxruntime's QLinearSigmoid)."""
    return op_kind(node, mods) == "activation" and not is_fused_activation(node, mods)


def _is_relu(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    return is_fused_activation(node, mods)


def _is_mul(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _MUL


def keeps_grid(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Ops that map a quantized grid onto itself (no new quantizer needed)."""
    return op_kind(node, mods) in _GRID_KINDS


def _is_add(node: fx.Node) -> bool:
    return op_kind(node, {}) == "add"


def _is_pool(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Average pools (modules), which get a quantizer of their own."""
    return node.op == "call_module" and op_kind(node, mods) in _POOL_KINDS


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the Conv/Linear modules in graph (execution) order."""
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    mods = dict(gm.named_modules())
    return [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(mods.get(n.target), QUANT_LAYERS)
    ]


def quantize_weights_(
    gm: fx.GraphModule,
    layers: list[str],
    prec: dict[str, tuple[str, str | None]],
    config: PTQConfig,
    lsq: bool,
) -> None:
    """Register a :class:`WeightFakeQuant` on every layer whose weights are not fp32."""
    mods = dict(gm.named_modules())
    for name in layers:
        wdt, _ = prec[name]
        if wdt == "fp32":
            continue
        mod = mods[name]
        mask = None
        if config.keep_zeros and bool((mod.weight == 0).any()):
            mask = (mod.weight != 0).float()
        parametrize.register_parametrization(
            mod,
            "weight",
            WeightFakeQuant(
                wdt,
                mod.weight.detach(),
                per_channel=config.per_channel,
                lsq=lsq,
                mask=mask,
                reduce_range=config.reduce_range and wdt == "int8",
            ),
        )


def grid_source(node: Any, mods: dict[str, nn.Module], stop: set | dict = frozenset()) -> Any:
    """The node whose quantized grid ``node`` carries: walk back over order-preserving ops
    (stopping at nodes in ``stop``)."""
    while isinstance(node, fx.Node) and keeps_grid(node, mods) and node not in stop:
        node = node.args[0]
    return node


class _Placer:
    """Inserts activation quantizers into ``gm`` and remembers each quantized node's dtype."""

    def __init__(self, gm: fx.GraphModule, config: PTQConfig, qat: bool) -> None:
        self.gm, self.graph, self.config, self.qat = gm, gm.graph, config, qat
        self.mods = dict(gm.named_modules())
        self.qdt: dict[fx.Node, str | None] = {}  # node -> dtype of the grid its output is on
        self.count = 0

    def insert_after(self, node: fx.Node, dtype: str, only_user: fx.Node | None = None) -> None:
        name = f"act_quant_{self.count}"
        self.count += 1
        self.gm.add_submodule(name, make_activation_quantizer(self.config, dtype, self.qat))
        with self.graph.inserting_after(node):
            q = self.graph.call_module(name, (node,))
        if only_user is None:
            node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        else:
            only_user.replace_input_with(node, q)
        self.qdt[q] = dtype

    def source(self, node: Any) -> Any:
        return grid_source(node, self.mods, self.qdt)

    def fused_end(self, node: fx.Node) -> fx.Node:
        """The last node of ``node`` plus the fused activations (ReLU/ReLU6/Hardtanh) that
        follow it as its only users."""
        users = list(node.users)
        while len(users) == 1 and _is_relu(users[0], self.mods):
            node = users[0]
            users = list(node.users)
        return node


def insert_activation_quantizers(
    gm: fx.GraphModule,
    layers: list[str],
    prec: dict[str, tuple[str, str | None]],
    config: PTQConfig,
    qat: bool,
) -> int:
    """Insert the activation quantizers (see the module docstring); returns how many."""
    p = _Placer(gm, config, qat)
    graph = gm.graph
    int_layers = {n for n in layers if prec[n][0] != "fp32" and prec[n][1] is not None}
    # graph inputs consumed by an integer layer get a quantizer right after them
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in int_layers:
            src = p.source(node.args[0])
            if isinstance(src, fx.Node) and src.op == "placeholder" and src not in p.qdt:
                p.qdt[src] = None
                p.insert_after(src, prec[node.target][1])
    done: set[fx.Node] = set(p.qdt)
    for node in list(graph.nodes):
        if node in done:
            continue
        done.add(node)
        if node.op == "call_module" and node.target in int_layers:
            end = p.fused_end(node)
            done.add(end)
            p.insert_after(end, prec[node.target][1])
        elif _is_add(node) or _is_mul(node):
            # residual sums and squeeze-and-excitation products of two quantized tensors
            ins = [a for a in node.args if isinstance(a, fx.Node)]
            dts = [p.qdt.get(p.source(a)) for a in ins]
            if len(ins) == 2 and all(dts):
                end = p.fused_end(node)
                done.add(end)
                p.insert_after(end, dts[0])
        elif _is_pool(node, p.mods) or is_float_activation(node, p.mods):
            dt = p.qdt.get(p.source(node.args[0])) if node.args else None
            if dt:
                end = p.fused_end(node)
                done.add(end)
                p.insert_after(end, dt)
    # the network's output (logits) keeps its full range: clipping it (percentile / KL) changes
    # which class wins, so its quantizer always uses min/max (or the moving average in QAT)
    for node in graph.nodes:
        if node.op == "output" and isinstance(node.args[0], fx.Node):
            last = node.args[0]
            if (
                last in p.qdt
                and last.op == "call_module"
                and config.observer in ("percentile", "kl")
            ):
                aq = gm.get_submodule(last.target)
                aq.observer = make_observer("moving_average" if qat else "minmax")
    # integer layers whose input is not on a quantized grid get a quantizer on that edge
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in int_layers:
            if not p.qdt.get(p.source(node.args[0])):
                p.insert_after(node.args[0], prec[node.target][1], only_user=node)
    return p.count
