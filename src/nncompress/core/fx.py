"""torch.fx helpers every family shares: one tracer whose errors name the module that failed,
and one classification of graph operations.

:func:`op_kind` maps an fx node to a *kind* ("relu", "maxpool", "add", "reshape", ...) from the
tables below; each family decides what a kind means for it (the channel dependency graph asks
whether an op keeps channels, quantization whether it keeps a quantized grid, dead-neuron
removal whether it passes a constant through). Kinds:

========================= =========================================================
relu, relu6               ReLU and ReLU6 (modules, functions, ``x.relu()``)
activation                other element-wise functions (GELU, SiLU, sigmoid, tanh, abs,
                          exp, neg, clamp, leaky ReLU, ...)
dropout, identity         dropout (any), ``nn.Identity`` and value-preserving methods
                          (``contiguous``, ``clone``, ``float``, ``to``, ``detach``, ``type_as``)
maxpool, avgpool          (non-adaptive) max / average pooling
adaptive_maxpool,         adaptive pooling
adaptive_avgpool
resize                    upsampling, interpolation, zero padding
add, arith                ``+`` (``add``), and ``- * /`` maximum / minimum (``arith``)
reduce                    mean / sum / amax / amin over dims
flatten, reshape          ``flatten`` (function, method, ``nn.Flatten``); ``view`` / ``reshape``
move_axis                 ``permute`` / ``transpose`` / ``unsqueeze``
cat, split                ``torch.cat``; ``chunk`` / ``split`` / ``unbind``
softmax                   softmax / log-softmax
shape, getattr, getitem   ``size()`` / ``dim()`` / ``numel()``; ``x.shape``; indexing
conv, linear, batchnorm,  the parametrized layers (Conv1d/2d, Linear, BatchNorm1d/2d,
layernorm, groupnorm,     LayerNorm, GroupNorm, PReLU)
prelu
placeholder, get_attr,    graph inputs, constants, the output
output
========================= =========================================================

A node of no kind (``None``) is an operation nobody has classified yet: callers refuse it
with an error naming it (:func:`op_name`, :func:`module_of`) rather than guess.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from .convs import is_conv_leaf, is_conv_subclass
from .errors import NncompressError

__all__ = ["TraceError", "module_of", "op_kind", "op_name", "trace"]


class TraceError(NncompressError, ValueError):
    """``torch.fx`` cannot trace a model; ``module`` names the submodule being traced."""

    def __init__(self, model: str, module: str, detail: str) -> None:
        self.module, self.detail = module, detail
        super().__init__(f"cannot trace {model} with torch.fx: {detail} (in module '{module}')")


class _Tracer(fx.Tracer):
    """fx tracer that remembers which module was being traced when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None
        self.conv_leaves: set[int] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # a Conv subclass padding inside its forward is one convolution (core.convs); decided
        # before tracing, because fx patches math functions while it traces
        if id(m) in self.conv_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or "<root>"
            raise


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, raising :class:`TraceError` naming the submodule
    whose ``forward`` could not be traced (data-dependent control flow, ...).

    ``nn.Conv1d`` / ``nn.Conv2d`` subclasses whose ``forward`` is zero padding followed by
    their convolution (:func:`nncompress.core.convs.is_conv_leaf`, e.g. "same" padding
    computed from the input size) stay single ``call_module`` nodes, like ``nn.Conv2d``."""
    tracer = _Tracer()
    tracer.conv_leaves = {id(m) for m in model.modules() if is_conv_subclass(m) and is_conv_leaf(m)}
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        detail = f"{type(exc).__name__}: {exc}"
        raise TraceError(type(model).__name__, tracer.failed_in or "<root>", detail) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# --------------------------------------------------------------------------------------------
# the classification
# --------------------------------------------------------------------------------------------

# isinstance checks in order (ReLU6 derives from Hardtanh, so it comes first)
_MODULE_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Conv1d, nn.Conv2d), "conv"),
    ((nn.Linear,), "linear"),
    ((nn.BatchNorm1d, nn.BatchNorm2d), "batchnorm"),
    ((nn.LayerNorm,), "layernorm"),
    ((nn.GroupNorm,), "groupnorm"),
    ((nn.PReLU,), "prelu"),
    ((nn.ReLU,), "relu"),
    ((nn.ReLU6,), "relu6"),
    (
        (
            nn.GELU,
            nn.SiLU,
            nn.Mish,
            nn.Sigmoid,
            nn.Tanh,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Hardtanh,
            nn.LeakyReLU,
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.Softplus,
            nn.Softsign,
        ),
        "activation",
    ),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout), "dropout"),
    ((nn.Identity,), "identity"),
    ((nn.MaxPool1d, nn.MaxPool2d), "maxpool"),
    ((nn.AvgPool1d, nn.AvgPool2d), "avgpool"),
    ((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d), "adaptive_maxpool"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), "adaptive_avgpool"),
    ((nn.Upsample, nn.ZeroPad2d), "resize"),
    ((nn.Flatten,), "flatten"),
    ((nn.Softmax, nn.LogSoftmax), "softmax"),
)


def _table(**kinds: tuple) -> dict[Any, str]:
    return {target: kind for kind, targets in kinds.items() for target in targets}


_FUNCTION_KINDS: dict[Any, str] = _table(
    relu=(torch.relu, torch.relu_, F.relu),
    relu6=(F.relu6,),
    activation=(
        torch.sigmoid,
        torch.tanh,
        F.gelu,
        F.silu,
        F.mish,
        F.sigmoid,
        F.tanh,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.leaky_relu,
        F.elu,
        F.softplus,
        operator.neg,
        torch.neg,
        torch.abs,
        torch.exp,
        torch.clamp,
    ),
    dropout=(F.dropout, F.dropout1d, F.dropout2d),
    maxpool=(F.max_pool1d, F.max_pool2d),
    avgpool=(F.avg_pool1d, F.avg_pool2d),
    adaptive_maxpool=(F.adaptive_max_pool1d, F.adaptive_max_pool2d),
    adaptive_avgpool=(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d),
    resize=(F.interpolate,),
    add=(operator.add, operator.iadd, torch.add),
    arith=(
        operator.sub,
        operator.isub,
        operator.mul,
        operator.imul,
        operator.truediv,
        torch.sub,
        torch.mul,
        torch.div,
        torch.maximum,
        torch.minimum,
    ),
    reduce=(torch.mean, torch.sum, torch.amax, torch.amin),
    flatten=(torch.flatten,),
    reshape=(torch.reshape,),
    move_axis=(torch.permute, torch.transpose, torch.unsqueeze),
    cat=(torch.cat, torch.concat),
    softmax=(torch.softmax, F.softmax),
    split=(torch.chunk, torch.split, torch.unbind),
    getitem=(operator.getitem,),
    getattr=(getattr,),
)

_METHOD_KINDS: dict[str, str] = _table(
    relu=("relu", "relu_"),
    activation=("sigmoid", "tanh", "abs", "exp", "neg", "clamp"),
    identity=("contiguous", "clone", "float", "to", "detach", "type_as"),
    add=("add", "add_", "__add__"),
    arith=("sub", "sub_", "mul", "mul_", "div", "div_"),
    reduce=("mean", "sum", "amax", "amin"),
    flatten=("flatten",),
    reshape=("view", "reshape"),
    move_axis=("permute", "transpose", "unsqueeze"),
    softmax=("softmax", "log_softmax"),
    split=("chunk", "split", "unbind"),
    shape=("size", "dim", "numel"),
)


def module_kind(module: nn.Module | None) -> str | None:
    """The kind of a module (``None``: not classified)."""
    for types, kind in _MODULE_KINDS:
        if isinstance(module, types):
            return kind
    return None


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The kind of an fx node (see the module docstring); ``modules`` is
    ``dict(graph_module.named_modules())``."""
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.op == "call_module":
        return module_kind(modules.get(str(node.target)))
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
    try:
        return _FUNCTION_KINDS.get(node.target)
    except TypeError:  # an unhashable target
        return None


def module_of(node: fx.Node) -> str:
    """Qualified name of the module a node was called from (for error messages)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path or "<root>"
    return "<root>"


def op_name(node: fx.Node) -> str:
    """A readable name of the node's operation (``torch.cat``, ``Tensor.view``...)."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")
    return str(t)
