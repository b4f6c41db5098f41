"""Channel dependency graph for filter (structured) pruning, built by tracing the model.

Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets": removing filter ``j`` of conv
layer ``i`` removes feature map ``j`` and therefore input channel ``j`` of every layer that reads
it (the next convolution, its BatchNorm, a Linear after a flatten...). When several layers write
into the same tensor (the two branches of a residual addition) they must drop the *same*
indices. This module finds those couplings for an arbitrary model.

How it works
------------
The model is traced with :func:`torch.fx.symbolic_trace` and shapes are propagated with one
example input. Every channel that a Conv/Linear layer produces gets a fresh *atom* (one per
output filter). Atoms then flow through the graph:

- element-wise ops (activations, pooling, dropout, BatchNorm, depthwise convs) keep them;
- ``a + b`` / ``a - b`` / ``a * b`` unify the atoms of ``a`` and ``b`` position by position (a
  union-find), so the residual branch and the shortcut share their channels; an identity
  shortcut ties the block's last conv to whatever produced the block input, so that whole chain
  becomes one group;
- ``torch.cat`` along the channel axis concatenates the atom lists (offsets map each index back
  to its producer);
- ``flatten`` repeats each atom ``H*W`` times, so one channel is ``H*W`` consecutive input
  features of the following Linear;
- ``permute``/``transpose``/``unsqueeze`` move the channel axis; ``mean``/``sum`` over other axes
  keep it;
- anything that mixes channels in a way we cannot slice (reshape with hard-coded sizes, slicing,
  ``chunk``, softmax over channels, grouped convs, GroupNorm, per-channel parameters used
  directly, the model inputs and outputs) *fixes* the atoms involved: they are never pruned.

A module or function the graph does not know raises :class:`GraphError` naming the op and the
module it was called from, rather than risking a silently wrong model.

The result is a list of :class:`ChannelGroup`: sets of producers whose output filters are
coupled, with, for every channel of the group, the positions it occupies in each member
(producer outputs, consumer inputs, BatchNorm/LayerNorm/depthwise followers).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..core.errors import NncompressError

__all__ = [
    "ChannelGroup",
    "DependencyGraph",
    "GraphError",
    "LayerCut",
    "build_dependency_graph",
]

log = logging.getLogger(__name__)


class GraphError(NncompressError, ValueError):
    """The model cannot be analysed, or a pruning plan is inconsistent with its couplings."""


# --------------------------------------------------------------------------------------------
# op tables
# --------------------------------------------------------------------------------------------

# Leaf modules that act on every channel independently and keep the channel count.
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
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
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
)
# Spatial ops: keep the channel axis (dim 1) and its size, change the other dims.
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.ZeroPad2d,
)
_PASS_FUNCS: set[Any] = {
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.mish,
    torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
    torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid,
    torch.nn.functional.hardtanh,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.elu,
    torch.nn.functional.softplus,
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    operator.neg,
    torch.neg,
    torch.abs,
    torch.exp,
    torch.clamp,
}
_SPATIAL_FUNCS: set[Any] = {
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool1d,
    torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.interpolate,
}
_PASS_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "float",
    "to",
    "detach",
    "abs",
    "exp",
    "neg",
    "clamp",
    "type_as",
}
_BINARY_FUNCS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_FUNCS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
# Ops whose result does not depend on channel identities of a tensor (shape queries).
_SHAPE_METHODS = {"size", "dim", "numel"}


# --------------------------------------------------------------------------------------------
# values flowing through the graph
# --------------------------------------------------------------------------------------------


@dataclass
class _Chan:
    """A tensor whose entries along ``axis`` carry the channel ``atoms`` (one id per index)."""

    axis: int
    atoms: np.ndarray  # (size along axis,) int64


_OPAQUE = object()  # a tensor whose channel layout we do not track (inputs, constants, ...)


@dataclass
class LayerCut:
    """What thinning keeps of one module: indices along its output / input channel dims.

    ``kind`` is one of ``conv``, ``linear``, ``depthwise``, ``batchnorm``, ``layernorm``.
    ``keep_out`` indexes weight dim 0 (and bias, BN/LN parameters, running statistics);
    ``keep_in`` indexes weight dim 1 of a Conv/Linear. ``None`` means unchanged.
    """

    module: str
    kind: str
    keep_out: list[int] | None = None
    keep_in: list[int] | None = None


@dataclass
class ChannelGroup:
    """Producers whose output filters are coupled, and every slot their channels occupy.

    Attributes
    ----------
    index : position in :attr:`DependencyGraph.groups`.
    producers : Conv/Linear layers writing these channels (weight dim 0).
    channels : one entry per coupled channel: ``{(module, role): [positions]}`` with role
        ``out`` (producer filter), ``in`` (consumer input channel/feature), ``follow``
        (BatchNorm/LayerNorm/depthwise conv channel).
    prunable : per channel, whether it may be removed.
    reasons : per channel, why it is fixed (``None`` if prunable).
    """

    index: int
    producers: list[str]
    channels: list[dict[tuple[str, str], list[int]]]
    prunable: list[bool]
    reasons: list[str | None]

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def num_prunable(self) -> int:
        return sum(self.prunable)

    @property
    def members(self) -> list[tuple[str, str]]:
        """Every (module, role) slot touched by the group."""
        seen: dict[tuple[str, str], None] = {}
        for ch in self.channels:
            for key in ch:
                seen.setdefault(key, None)
        return list(seen)

    def producer_positions(self, channel: int) -> list[tuple[str, int]]:
        """``[(producer, filter index)]`` of one channel of the group."""
        return [
            (mod, pos)
            for (mod, role), positions in self.channels[channel].items()
            if role == "out"
            for pos in positions
        ]

    def describe(self) -> dict:
        fixed = sorted({r for r in self.reasons if r})
        return {
            "index": self.index,
            "producers": self.producers,
            "channels": self.size,
            "prunable": self.num_prunable,
            "members": [f"{m}:{r}" for m, r in self.members],
            "fixed_because": fixed,
        }


@dataclass
class _LayerInfo:
    kind: str
    positions: int  # output positions per sample (H_out*W_out, or tokens for Linear)
    groups: int = 1


# --------------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """fx tracer that remembers which module was being traced when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or "<root>"
            raise


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        where = tracer.failed_in or "<root>"
        raise GraphError(
            f"cannot trace the model with torch.fx: {type(exc).__name__}: {exc} "
            f"(in module '{where}'); data-dependent control flow or unsupported Python in "
            "forward() prevents building the channel dependency graph"
        ) from exc
    return fx.GraphModule(model, graph)


def _module_of(node: fx.Node) -> str:
    """Qualified name of the module a node was called from (for error messages)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path or "<root>"
    return "<root>"


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")
    return str(t)


# --------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------


class DependencyGraph:
    """Channel couplings of ``model`` for one ``example_input`` (see the module docstring).

    Build it with :func:`build_dependency_graph`. The graph refers to modules by qualified name;
    it stays valid as long as the model's structure does not change.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self._parent: list[int] = []
        self._fixed: dict[int, str] = {}
        self._out: dict[str, np.ndarray] = {}  # producer -> atoms of its output filters
        self._in: dict[str, np.ndarray] = {}  # consumer -> atoms of its input channels
        self._follow: dict[str, np.ndarray] = {}  # BN/LN/depthwise -> atoms of its channels
        self.layers: dict[str, _LayerInfo] = {}
        self.batch = int(example_input.shape[0]) if example_input.dim() else 1
        modules = dict(model.named_modules())
        was_training = model.training
        model.eval()
        try:
            gm = _trace(model)
            with torch.no_grad():
                try:
                    ShapeProp(gm).propagate(example_input)
                except Exception as exc:
                    raise GraphError(
                        f"running the traced model on an example input of shape "
                        f"{tuple(example_input.shape)} failed: {type(exc).__name__}: {exc}"
                    ) from exc
            self._walk(gm, modules)
            self._record_sizes(modules)
        finally:
            model.train(was_training)
        self.groups: list[ChannelGroup] = self._make_groups()

    # ---- union-find ------------------------------------------------------------------------

    def _new(self, n: int, reason: str | None = None) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        atoms = np.arange(start, start + n, dtype=np.int64)
        if reason is not None:
            for a in atoms:
                self._fixed[int(a)] = reason
        return atoms

    def _find(self, a: int) -> int:
        parent = self._parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(int(a)), self._find(int(b))
        if ra == rb:
            return
        self._parent[rb] = ra
        reason = self._fixed.pop(rb, None)
        if reason is not None and ra not in self._fixed:
            self._fixed[ra] = reason

    def _unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            self._union(x, y)

    def _fix(self, atoms: np.ndarray, reason: str) -> None:
        for a in atoms.tolist():
            r = self._find(a)
            self._fixed.setdefault(r, reason)

    def _roots(self, atoms: np.ndarray) -> np.ndarray:
        return np.fromiter((self._find(a) for a in atoms.tolist()), np.int64, len(atoms))

    # ---- walking the fx graph --------------------------------------------------------------

    def _walk(self, gm: fx.GraphModule, modules: Mapping[str, nn.Module]) -> None:
        env: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            env[node] = self._visit(node, env, modules)

    @staticmethod
    def _shape(node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def _chan(self, value: Any, node: Any, axis: int, reason: str) -> np.ndarray | None:
        """Atoms of ``value`` along ``axis``; an opaque tensor gets fresh fixed atoms."""
        if isinstance(value, _Chan) and value.axis == axis:
            return value.atoms
        shape = self._shape(node)
        if shape is None or axis >= len(shape):
            return None
        if isinstance(value, _Chan):  # tracked on another axis: both become unprunable
            self._fix(value.atoms, reason)
        return self._new(shape[axis], reason)

    def _fix_value(self, value: Any, reason: str) -> None:
        if isinstance(value, _Chan):
            self._fix(value.atoms, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._fix_value(v, reason)

    def _inputs(self, node: fx.Node, env: Mapping[fx.Node, Any]) -> list[tuple[fx.Node, Any]]:
        """Tensor-valued node arguments (flattened) with their values."""
        found: list[tuple[fx.Node, Any]] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                found.append((a, env.get(a)))

        fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def _visit(self, node: fx.Node, env: Mapping[fx.Node, Any], modules) -> Any:
        op, where = node.op, _module_of(node)
        shape = self._shape(node)
        if op == "placeholder":
            return _OPAQUE if shape is not None else None
        if op == "get_attr":
            return _OPAQUE if shape is not None else None
        if op == "output":
            for _, v in self._inputs(node, env):
                self._fix_value(v, "model output")
            return None
        args = node.args
        x = args[0] if args else None
        xv = env.get(x) if isinstance(x, fx.Node) else None

        if op == "call_module":
            mod = modules[str(node.target)]
            return self._visit_module(node, str(node.target), mod, x, xv, env)

        target = node.target
        if op == "call_method" and target in _SHAPE_METHODS:
            return None
        if op == "call_function" and target is getattr and len(args) > 1:
            return None  # x.shape, x.dtype, ...
        if op == "call_function" and target is operator.getitem:
            return self._visit_getitem(node, x, xv, where)
        if shape is None and not isinstance(node.meta.get("tensor_meta"), (tuple, list)):
            # A non-tensor result computed from tensors we do not track, e.g. ``int`` maths on
            # sizes: channel identities do not enter it.
            if all(not isinstance(v, _Chan) for _, v in self._inputs(node, env)):
                return None

        if (op == "call_function" and target in _PASS_FUNCS) or (
            op == "call_method" and target in _PASS_METHODS
        ):
            return self._passthrough(node, x, xv)
        if op == "call_function" and target in _SPATIAL_FUNCS:
            return self._spatial(node, x, xv, where, _op_name(node))
        if (op == "call_function" and target in _BINARY_FUNCS) or (
            op == "call_method" and target in _BINARY_METHODS
        ):
            return self._elementwise(node, env, where)
        if op == "call_function" and target in (torch.cat, torch.concat):
            return self._visit_cat(node, env, where)
        if (op == "call_function" and target is torch.flatten) or (
            op == "call_method" and target == "flatten"
        ):
            start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self._flatten(node, x, xv, start, end, where)
        if op == "call_method" and target in ("view", "reshape"):
            return self._reshape(node, x, xv, where)
        if op == "call_function" and target is torch.reshape:
            return self._reshape(node, x, xv, where)
        if (op == "call_method" and target in ("permute", "transpose", "unsqueeze")) or (
            op == "call_function" and target in (torch.permute, torch.transpose, torch.unsqueeze)
        ):
            return self._move_axis(node, x, xv, str(getattr(target, "__name__", target)), where)
        if (op == "call_function" and target in _REDUCE_FUNCS) or (
            op == "call_method" and target in _REDUCE_METHODS
        ):
            return self._reduce(node, x, xv, where)
        if (op == "call_function" and target in (torch.softmax, torch.nn.functional.softmax)) or (
            op == "call_method" and target in ("softmax", "log_softmax")
        ):
            dim = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(xv, _Chan) and (
                dim is None or dim % len(self._shape(x) or (0,)) == xv.axis
            ):
                self._fix(xv.atoms, f"softmax over channels at '{where}'")
                return _OPAQUE
            return xv
        if (op == "call_method" and target in ("chunk", "split", "unbind")) or (
            op == "call_function" and target in (torch.chunk, torch.split, torch.unbind)
        ):
            self._fix_value(xv, f"{_op_name(node)} at '{where}'")
            return _OPAQUE
        raise GraphError(
            f"unsupported operation {_op_name(node)} in module '{where}' (node '{node.name}'): "
            "the channel dependency graph does not know how it couples channels, so filter "
            "pruning refuses to guess (rewrite it with supported ops, or trace a model "
            "without it)"
        )

    # ---- per-op rules -----------------------------------------------------------------------

    def _passthrough(self, node: fx.Node, x: Any, xv: Any) -> Any:
        shape_in, shape_out = self._shape(x), self._shape(node)
        if isinstance(xv, _Chan) and shape_in != shape_out:
            self._fix(xv.atoms, f"shape-changing {_op_name(node)} at '{_module_of(node)}'")
            return _OPAQUE
        return xv if shape_out is not None else None

    def _spatial(self, node: fx.Node, x: Any, xv: Any, where: str, what: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, _Chan):
            return _OPAQUE if so is not None else None
        if si is None or so is None or len(si) != len(so) or xv.axis != 1 or si[1] != so[1]:
            self._fix(xv.atoms, f"{what} at '{where}' does not keep channels on dim 1")
            return _OPAQUE
        return xv

    def _visit_module(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any, env) -> Any:
        shape_out = self._shape(node)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            assert shape_out is not None
            positions = int(np.prod(shape_out[2:], dtype=np.int64))
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            self.layers[name] = _LayerInfo(
                "depthwise" if depthwise else "conv", positions, mod.groups
            )
            if depthwise:
                atoms = self._chan(xv, x, 1, f"input of depthwise conv '{name}'")
                assert atoms is not None
                if name in self._follow:
                    self._unify(self._follow[name], atoms)
                else:
                    self._follow[name] = atoms
                return _Chan(1, self._follow[name])
            if mod.groups > 1:
                reason = f"grouped conv '{name}' (groups={mod.groups})"
                self._fix_value(xv, reason)
                out = self._out.setdefault(name, self._new(mod.out_channels, reason))
                return _Chan(1, out)
            atoms = self._chan(xv, x, 1, f"input of conv '{name}'")
            assert atoms is not None
            self._register_in(name, atoms)
            return _Chan(1, self._out.setdefault(name, self._new(mod.out_channels)))
        if isinstance(mod, nn.Linear):
            assert shape_out is not None
            ndim = len(shape_out)
            positions = int(np.prod(shape_out[1:-1], dtype=np.int64)) if ndim > 2 else 1
            self.layers[name] = _LayerInfo("linear", positions)
            atoms = self._chan(xv, x, ndim - 1, f"input of Linear '{name}'")
            assert atoms is not None
            self._register_in(name, atoms)
            return _Chan(ndim - 1, self._out.setdefault(name, self._new(mod.out_features)))
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.layers[name] = _LayerInfo("batchnorm", 0)
            atoms = self._chan(xv, x, 1, f"input of BatchNorm '{name}'")
            assert atoms is not None
            self._register_follow(name, atoms)
            return _Chan(1, atoms)
        if isinstance(mod, nn.LayerNorm):
            self.layers[name] = _LayerInfo("layernorm", 0)
            ndim = len(shape_out or ())
            atoms = self._chan(xv, x, ndim - 1, f"input of LayerNorm '{name}'")
            assert atoms is not None
            if len(mod.normalized_shape) != 1:
                self._fix(atoms, f"LayerNorm '{name}' normalises over several dims")
                return _Chan(ndim - 1, atoms)
            # Removing channels changes the mean/variance LayerNorm computes over the others,
            # so thinning is exact only for channels that are not there at all; the channels
            # are prunable like any others (structured pruning of a transformer's width).
            self._register_follow(name, atoms)
            return _Chan(ndim - 1, atoms)
        if isinstance(mod, _PASS_MODULES):
            return self._passthrough(node, x, xv)
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                self._fix_value(xv, f"per-channel PReLU '{name}'")
            return self._passthrough(node, x, xv)
        if isinstance(mod, _SPATIAL_MODULES):
            return self._spatial(node, x, xv, name, type(mod).__name__)
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, x, xv, mod.start_dim, mod.end_dim, name)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            ndim = len(shape_out or ())
            if isinstance(xv, _Chan) and (mod.dim is None or mod.dim % ndim == xv.axis):
                self._fix(xv.atoms, f"softmax over channels at '{name}'")
                return _OPAQUE
            return xv
        if isinstance(mod, nn.GroupNorm):
            self._fix_value(xv, f"GroupNorm '{name}' couples channels within groups")
            return _OPAQUE
        raise GraphError(
            f"unsupported module type {type(mod).__name__} at '{name}': the channel dependency "
            "graph does not know how it maps channels, so filter pruning refuses to guess"
        )

    def _register_in(self, name: str, atoms: np.ndarray) -> None:
        if name in self._in:  # module called twice: both inputs must share channels
            self._unify(self._in[name], atoms)
        else:
            self._in[name] = atoms

    def _register_follow(self, name: str, atoms: np.ndarray) -> None:
        if name in self._follow:
            self._unify(self._follow[name], atoms)
        else:
            self._follow[name] = atoms

    def _elementwise(self, node: fx.Node, env, where: str) -> Any:
        out_shape = self._shape(node)
        if out_shape is None:
            return None
        n = len(out_shape)
        tensors = self._inputs(node, env)
        tracked = [
            (v, v.axis + n - len(self._shape(a) or ()))
            for a, v in tensors
            if isinstance(v, _Chan) and self._shape(a) is not None
        ]
        if not tracked:
            return _OPAQUE
        axes = {ax for _, ax in tracked}
        what = f"{_op_name(node)} at '{where}'"
        if len(axes) > 1:
            for v, _ in tracked:
                self._fix(v.atoms, f"{what} mixes tensors whose channels lie on different dims")
            return _OPAQUE
        axis = axes.pop()
        size = out_shape[axis]
        result: np.ndarray | None = None
        for a, v in tensors:
            s = self._shape(a)
            if s is None:
                continue
            local = axis - (n - len(s))
            dim = s[local] if 0 <= local < len(s) else 1
            if dim == 1 and size != 1:
                if isinstance(v, _Chan):
                    self._fix(v.atoms, f"{what} broadcasts one channel over {size}")
                continue
            if isinstance(v, _Chan) and v.axis == local:
                atoms = v.atoms
            else:
                atoms = self._new(dim, f"{what} combines channels with an untracked tensor")
                if isinstance(v, _Chan):
                    self._fix(v.atoms, f"{what} with channels on another dim")
            if result is None:
                result = atoms
            else:
                self._unify(result, atoms)
        if result is None:
            return _OPAQUE
        return _Chan(axis, result)

    def _visit_cat(self, node: fx.Node, env, where: str) -> Any:
        out_shape = self._shape(node)
        tensors_arg = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if out_shape is None or not isinstance(tensors_arg, (list, tuple)):
            raise GraphError(f"torch.cat in module '{where}': cannot read its tensor list")
        dim %= len(out_shape)
        parts = [(a, env.get(a)) for a in tensors_arg if isinstance(a, fx.Node)]
        tracked_axes = {v.axis for _, v in parts if isinstance(v, _Chan)}
        if not tracked_axes:
            return _OPAQUE
        what = f"torch.cat at '{where}'"
        if tracked_axes == {dim}:
            pieces = [
                self._chan(v, a, dim, f"{what} joins channels with an untracked tensor")
                for a, v in parts
            ]
            return _Chan(dim, np.concatenate([p for p in pieces if p is not None]))
        if len(tracked_axes) == 1:  # concatenation along another dim: channels aligned
            axis = tracked_axes.pop()
            result = None
            for a, v in parts:
                atoms = self._chan(v, a, axis, f"{what} with an untracked tensor")
                if atoms is None:
                    continue
                if result is None:
                    result = atoms
                else:
                    self._unify(result, atoms)
            return _Chan(axis, result)
        for _, v in parts:
            self._fix_value(v, f"{what} mixes channel layouts")
        return _OPAQUE

    def _flatten(self, node: fx.Node, x: Any, xv: Any, start: int, end: int, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, _Chan):
            return _OPAQUE if so is not None else None
        if si is None or so is None:
            self._fix(xv.atoms, f"flatten at '{where}'")
            return _OPAQUE
        n = len(si)
        start, end = start % n, end % n
        a = xv.axis
        if a < start:
            return _Chan(a, xv.atoms)
        if a > end:
            return _Chan(a - (end - start), xv.atoms)
        inner = int(np.prod(si[a + 1 : end + 1], dtype=np.int64))
        outer = int(np.prod(si[start:a], dtype=np.int64))
        # one channel = `inner` consecutive features, repeated `outer` times (row-major order)
        atoms = np.tile(np.repeat(xv.atoms, inner), outer)  # (prod(si[start:end+1]),)
        return _Chan(start, atoms)

    def _reshape(self, node: fx.Node, x: Any, xv: Any, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, _Chan):
            return _OPAQUE if so is not None else None
        if si is None or so is None:
            self._fix(xv.atoms, f"reshape at '{where}'")
            return _OPAQUE
        if si == so:
            return xv
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        if "shape" in node.kwargs:
            sizes = tuple(node.kwargs["shape"])
        a = xv.axis
        # flatten-like: keeps dims [0, start) and merges [start, end] into one dim given as -1.
        # A hard-coded size for the channel dim would break once channels are removed.
        for start in range(len(si)):
            if (
                len(so) == start + 1
                and len(sizes) == start + 1
                and tuple(so[:start]) == tuple(si[:start])
                and sizes[start] == -1
                and not (a < start and isinstance(sizes[a], int))
            ):
                return self._flatten(node, x, xv, start, len(si) - 1, where)
        self._fix(
            xv.atoms,
            f"{_op_name(node)} {tuple(si)} -> {tuple(so)} at '{where}' (only flattening the "
            "trailing dims with -1 is understood)",
        )
        return _OPAQUE

    def _move_axis(self, node: fx.Node, x: Any, xv: Any, what: str, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, _Chan) or si is None or so is None:
            return xv if not isinstance(xv, _Chan) else _OPAQUE
        rest = list(node.args[1:])
        if not all(isinstance(r, int) for r in rest) or node.kwargs:
            self._fix(xv.atoms, f"{what} with non-constant dims at '{where}'")
            return _OPAQUE
        n, a = len(si), xv.axis
        if what == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = [d % n for d in dims]
            return _Chan(dims.index(a), xv.atoms)
        if what == "transpose":
            d0, d1 = rest[0] % n, rest[1] % n
            return _Chan(d1 if a == d0 else d0 if a == d1 else a, xv.atoms)
        d = rest[0] % (n + 1)  # unsqueeze
        return _Chan(a + 1 if d <= a else a, xv.atoms)

    def _reduce(self, node: fx.Node, x: Any, xv: Any, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, _Chan):
            return _OPAQUE if so is not None else None
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if si is None or so is None or dims is None:
            self._fix(xv.atoms, f"{_op_name(node)} over all dims at '{where}'")
            return _OPAQUE
        n = len(si)
        dims = [d % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if xv.axis in dims:
            self._fix(xv.atoms, f"{_op_name(node)} over the channel dim at '{where}'")
            return _OPAQUE
        return _Chan(xv.axis if keep else xv.axis - sum(d < xv.axis for d in dims), xv.atoms)

    def _visit_getitem(self, node: fx.Node, x: Any, xv: Any, where: str) -> Any:
        if self._shape(x) is not None and isinstance(xv, _Chan):  # slicing a tracked tensor
            self._fix(xv.atoms, f"indexing/slicing at '{where}'")
            return _OPAQUE
        if self._shape(node) is None and not isinstance(node.meta.get("tensor_meta"), tuple):
            return None
        return _OPAQUE

    # ---- results ----------------------------------------------------------------------------

    def _make_groups(self) -> list[ChannelGroup]:
        # the union-find is final now: cache every slot's roots
        self._roots_of = {
            (name, role): self._roots(atoms)
            for role, table in (("out", self._out), ("in", self._in), ("follow", self._follow))
            for name, atoms in table.items()
        }
        # channel (root) -> {(module, role): positions}
        where: dict[int, dict[tuple[str, str], list[int]]] = {}
        order: list[int] = []
        for role, table in (("out", self._out), ("in", self._in), ("follow", self._follow)):
            for name in table:
                for pos, root in enumerate(self._roots_of[name, role].tolist()):
                    if root not in where:
                        where[root] = {}
                        order.append(root)
                    where[root].setdefault((name, role), []).append(pos)
        # producers sharing any channel form one group (a second union-find, over producers)
        prod_parent: dict[str, str] = {name: name for name in self._out}

        def pfind(p: str) -> str:
            while prod_parent[p] != p:
                prod_parent[p] = prod_parent[prod_parent[p]]
                p = prod_parent[p]
            return p

        for root in order:
            prods = [m for (m, r) in where[root] if r == "out"]
            for other in prods[1:]:
                a, b = pfind(prods[0]), pfind(other)
                if a != b:
                    prod_parent[b] = a
        by_group: dict[str, list[int]] = {}
        for root in order:
            prods = [m for (m, r) in where[root] if r == "out"]
            if prods:
                by_group.setdefault(pfind(prods[0]), []).append(root)
        self._root_group: dict[int, int] = {}
        groups = []
        for roots in by_group.values():
            producers = list(dict.fromkeys(m for r in roots for (m, k) in where[r] if k == "out"))
            first = producers[0]
            roots = sorted(roots, key=lambda r: (first, *where[r].get((first, "out"), [1 << 30])))
            idx = len(groups)
            for r in roots:
                self._root_group[r] = idx
            groups.append(
                ChannelGroup(
                    index=idx,
                    producers=producers,
                    channels=[where[r] for r in roots],
                    prunable=[r not in self._fixed for r in roots],
                    reasons=[self._fixed.get(r) for r in roots],
                )
            )
        self._where = where
        return groups

    def group_of(self, module: str) -> ChannelGroup:
        """The group whose producers include ``module`` (a Conv/Linear qualified name)."""
        if module not in self._out:
            raise GraphError(
                f"module '{module}' is not a prunable producer; producers: {sorted(self._out)}"
            )
        root = self._find(int(self._out[module][0]))
        return self.groups[self._root_group[root]]

    @property
    def producers(self) -> list[str]:
        """Every Conv/Linear layer whose output filters the graph tracks."""
        return list(self._out)

    def expand(self, plan: Mapping[str, Sequence[int]]) -> dict[str, LayerCut]:
        """Expand ``{producer: output indices to remove}`` to every coupled module.

        Raises :class:`GraphError` if a module is not a producer, an index is out of range, a
        channel is fixed (with the reason), two coupled producers ask for different indices, or
        a module would lose all its channels.
        """
        removed: set[int] = set()
        requested: dict[str, set[int]] = {}
        for name, indices in plan.items():
            if name not in self._out:
                kind = self.layers.get(name)
                hint = (
                    f" (a {kind.kind} layer: prune the layer that produces its input)"
                    if kind
                    else ""
                )
                raise GraphError(
                    f"plan entry '{name}': not a prunable Conv/Linear producer{hint}; "
                    f"producers: {sorted(self._out)}"
                )
            atoms = self._out[name]
            idx = set()
            for i in indices:
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                    raise GraphError(f"plan entry '{name}': index {i!r} is not an integer")
                if not 0 <= int(i) < len(atoms):
                    raise GraphError(
                        f"plan entry '{name}': index {int(i)} out of range [0, {len(atoms)})"
                    )
                idx.add(int(i))
            requested[name] = idx
            for i in idx:
                root = self._find(int(atoms[i]))
                if root in self._fixed:
                    raise GraphError(
                        f"plan entry '{name}': channel {i} cannot be removed: {self._fixed[root]}"
                    )
                removed.add(root)
        for name, idx in requested.items():
            implied = {
                i for i, r in enumerate(self._roots_of[name, "out"].tolist()) if r in removed
            }
            if implied != idx:
                extra = sorted(implied - idx)[:8]
                raise GraphError(
                    f"plan entry '{name}': coupled producers ask to remove different channels "
                    f"(the plan's other entries also remove its channels {extra}); coupled "
                    f"layers: {self.group_of(name).producers}"
                )
        cuts: dict[str, LayerCut] = {}

        gone = np.fromiter(removed, np.int64, len(removed))

        def keep(name: str, role: str, what: str) -> list[int] | None:
            atoms = self._roots_of[name, role]
            mask = ~np.isin(atoms, gone)
            if mask.all():
                return None
            if not mask.any():
                raise GraphError(
                    f"module '{name}' would lose all its {len(atoms)} {what}; keep at least one"
                )
            return np.flatnonzero(mask).tolist()

        for name in self._out:
            k = keep(name, "out", "output channels")
            if k is not None:
                cuts.setdefault(name, LayerCut(name, self.layers[name].kind)).keep_out = k
        for name in self._in:
            k = keep(name, "in", "input channels")
            if k is not None:
                cuts.setdefault(name, LayerCut(name, self.layers[name].kind)).keep_in = k
        for name in self._follow:
            k = keep(name, "follow", "channels")
            if k is not None:
                cuts.setdefault(name, LayerCut(name, self.layers[name].kind)).keep_out = k
        return cuts

    def macs(self, cuts: Mapping[str, LayerCut] | None = None) -> dict[str, int]:
        """Dense MACs per sample of every Conv/Linear layer after ``cuts`` (see stats.count_macs).

        ``positions * weight.numel()`` with the kept channel counts; ``cuts=None`` gives the
        unpruned model.
        """
        out: dict[str, int] = {}
        for name, info in self.layers.items():
            if info.kind not in ("conv", "linear", "depthwise"):
                continue
            out[name] = info.positions * self._weight_numel(name, cuts)
        return out

    def _weight_numel(self, name: str, cuts: Mapping[str, LayerCut] | None) -> int:
        info = self.layers[name]
        cut = (cuts or {}).get(name)
        n_out = self._n_out(name) if cut is None or cut.keep_out is None else len(cut.keep_out)
        if info.kind == "depthwise":
            return n_out * self._kernel[name]
        n_in = self._n_in[name] if cut is None or cut.keep_in is None else len(cut.keep_in)
        return n_out * (n_in // info.groups) * self._kernel[name]

    def _n_out(self, name: str) -> int:
        if name in self._out:
            return len(self._out[name])
        return len(self._follow[name])

    def _record_sizes(self, modules: Mapping[str, nn.Module]) -> None:
        """Remember kernel sizes and input widths (used by :meth:`macs`)."""
        self._kernel: dict[str, int] = {}
        self._n_in: dict[str, int] = {}
        for name, info in self.layers.items():
            if info.kind not in ("conv", "linear", "depthwise"):
                continue
            m = modules[name]
            if isinstance(m, nn.Linear):
                self._kernel[name], self._n_in[name] = 1, m.in_features
            else:
                self._kernel[name] = int(np.prod(m.kernel_size))
                self._n_in[name] = m.in_channels

    def describe(self) -> list[dict]:
        """JSON-able summary of the groups."""
        return [g.describe() for g in self.groups]


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> DependencyGraph:
    """Trace ``model`` on ``example_input`` and return its channel :class:`DependencyGraph`.

    ``model.training`` is restored afterwards; BatchNorm statistics are not touched (the shape
    pass runs in eval mode without gradients).
    """
    if not isinstance(example_input, torch.Tensor):
        raise GraphError(
            f"example_input must be a torch.Tensor, got {type(example_input).__name__}"
        )
    return DependencyGraph(model, example_input)
