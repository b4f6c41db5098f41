"""The per-operation rules of the channel dependency graph, as lookup tables.

:class:`ChannelWalker` visits the traced graph in order; each node's kind
(:func:`nncompress.core.fx.op_kind`) picks its rule in :data:`_OP_RULES` (functions and
methods) or :data:`_MODULE_RULES` (modules). A rule maps the channel atoms of its inputs to its
output: element-wise ops keep them, ``+`` unifies them, ``cat`` concatenates them, ``flatten``
repeats them ``H*W`` times, and anything that mixes channels in a way we cannot slice fixes
them. An op with no rule raises :class:`GraphError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ...core.convs import is_conv_subclass, unrecognised_conv_message
from ...core.fx import module_of, op_kind, op_name
from .atoms import OPAQUE, Chan, ChannelAtoms
from .errors import GraphError

__all__ = ["ChannelWalker", "LayerInfo"]


@dataclass
class LayerInfo:
    """What the walk learned about one Conv/Linear/BatchNorm/LayerNorm module."""

    kind: str
    positions: int  # output positions per sample (H_out*W_out, or tokens for Linear)
    groups: int = 1


class ChannelWalker(ChannelAtoms):
    """Walks a shape-propagated fx graph and records which atoms every module produces
    (``_out``), reads (``_in``) and follows channel-wise (``_follow``)."""

    def __init__(self) -> None:
        super().__init__()
        self._out: dict[str, np.ndarray] = {}  # producer -> atoms of its output filters
        self._in: dict[str, np.ndarray] = {}  # consumer -> atoms of its input channels
        self._follow: dict[str, np.ndarray] = {}  # BN/LN/depthwise -> atoms of its channels
        self.layers: dict[str, LayerInfo] = {}

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
        if isinstance(value, Chan) and value.axis == axis:
            return value.atoms
        shape = self._shape(node)
        if shape is None or axis >= len(shape):
            return None
        if isinstance(value, Chan):  # tracked on another axis: both become unprunable
            self._fix(value.atoms, reason)
        return self._new(shape[axis], reason)

    def _fix_value(self, value: Any, reason: str) -> None:
        if isinstance(value, Chan):
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
        kind, where = op_kind(node, modules), module_of(node)
        shape = self._shape(node)
        if kind in ("placeholder", "get_attr"):
            return OPAQUE if shape is not None else None
        if kind == "output":
            for _, v in self._inputs(node, env):
                self._fix_value(v, "model output")
            return None
        args = node.args
        x = args[0] if args else None
        xv = env.get(x) if isinstance(x, fx.Node) else None
        if node.op == "call_module":
            return self._visit_module(
                node, kind, str(node.target), modules[str(node.target)], x, xv
            )
        if kind == "shape" or (kind == "getattr" and len(args) > 1):
            return None  # x.size(), x.shape, x.dtype, ...
        if kind == "getitem":
            return self._visit_getitem(node, x, xv, where)
        if shape is None and not isinstance(node.meta.get("tensor_meta"), (tuple, list)):
            # A non-tensor result computed from tensors we do not track, e.g. ``int`` maths on
            # sizes: channel identities do not enter it.
            if all(not isinstance(v, Chan) for _, v in self._inputs(node, env)):
                return None
        rule = _OP_RULES.get(kind)
        if rule is None and is_conv_subclass(modules.get(where)):
            raise GraphError(
                unrecognised_conv_message(where, modules[where])
                + "; filter pruning cannot follow its channels"
            )
        if rule is None:
            raise GraphError(
                f"unsupported operation {op_name(node)} in module '{where}' (node '{node.name}'): "
                "the channel dependency graph does not know how it couples channels, so filter "
                "pruning refuses to guess (rewrite it with supported ops, or trace a model "
                "without it)"
            )
        return rule(self, node, x, xv, env, where)

    def _visit_module(
        self, node: fx.Node, kind: str | None, name: str, mod: nn.Module, x: Any, xv: Any
    ) -> Any:
        rule = _MODULE_RULES.get(kind)
        if rule is None:
            raise GraphError(
                f"unsupported module type {type(mod).__name__} at '{name}': the channel "
                "dependency graph does not know how it maps channels, so filter pruning refuses "
                "to guess"
            )
        return rule(self, node, name, mod, x, xv)

    # ---- module rules -----------------------------------------------------------------------

    def _conv(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any) -> Any:
        shape_out = self._shape(node)
        assert shape_out is not None
        positions = int(np.prod(shape_out[2:], dtype=np.int64))
        depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
        self.layers[name] = LayerInfo("depthwise" if depthwise else "conv", positions, mod.groups)
        if depthwise:
            atoms = self._chan(xv, x, 1, f"input of depthwise conv '{name}'")
            assert atoms is not None
            if name in self._follow:
                self._unify(self._follow[name], atoms)
            else:
                self._follow[name] = atoms
            return Chan(1, self._follow[name])
        if mod.groups > 1:
            reason = f"grouped conv '{name}' (groups={mod.groups})"
            self._fix_value(xv, reason)
            out = self._out.setdefault(name, self._new(mod.out_channels, reason))
            return Chan(1, out)
        atoms = self._chan(xv, x, 1, f"input of conv '{name}'")
        assert atoms is not None
        self._register_in(name, atoms)
        return Chan(1, self._out.setdefault(name, self._new(mod.out_channels)))

    def _linear(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any) -> Any:
        shape_out = self._shape(node)
        assert shape_out is not None
        ndim = len(shape_out)
        positions = int(np.prod(shape_out[1:-1], dtype=np.int64)) if ndim > 2 else 1
        self.layers[name] = LayerInfo("linear", positions)
        atoms = self._chan(xv, x, ndim - 1, f"input of Linear '{name}'")
        assert atoms is not None
        self._register_in(name, atoms)
        return Chan(ndim - 1, self._out.setdefault(name, self._new(mod.out_features)))

    def _batchnorm(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any) -> Any:
        self.layers[name] = LayerInfo("batchnorm", 0)
        atoms = self._chan(xv, x, 1, f"input of BatchNorm '{name}'")
        assert atoms is not None
        self._register_follow(name, atoms)
        return Chan(1, atoms)

    def _layernorm(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any) -> Any:
        self.layers[name] = LayerInfo("layernorm", 0)
        ndim = len(self._shape(node) or ())
        atoms = self._chan(xv, x, ndim - 1, f"input of LayerNorm '{name}'")
        assert atoms is not None
        if len(mod.normalized_shape) != 1:
            self._fix(atoms, f"LayerNorm '{name}' normalises over several dims")
            return Chan(ndim - 1, atoms)
        # Removing channels changes the mean/variance LayerNorm computes over the others,
        # so thinning is exact only for channels that are not there at all; the channels
        # are prunable like any others (structured pruning of a transformer's width).
        self._register_follow(name, atoms)
        return Chan(ndim - 1, atoms)

    def _prelu(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any) -> Any:
        if mod.num_parameters > 1:
            self._fix_value(xv, f"per-channel PReLU '{name}'")
        return self._passthrough(node, x, xv)

    def _softmax_module(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any) -> Any:
        ndim = len(self._shape(node) or ())
        if isinstance(xv, Chan) and (mod.dim is None or mod.dim % ndim == xv.axis):
            self._fix(xv.atoms, f"softmax over channels at '{name}'")
            return OPAQUE
        return xv

    def _groupnorm(self, node: fx.Node, name: str, mod: nn.Module, x: Any, xv: Any) -> Any:
        self._fix_value(xv, f"GroupNorm '{name}' couples channels within groups")
        return OPAQUE

    # ---- function and method rules ---------------------------------------------------------

    def _flatten_op(self, node: fx.Node, x: Any, xv: Any, env, where: str) -> Any:
        args = node.args
        start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        end = node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
        return self._flatten(node, x, xv, start, end, where)

    def _softmax_op(self, node: fx.Node, x: Any, xv: Any, env, where: str) -> Any:
        args = node.args
        dim = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
        if isinstance(xv, Chan) and (dim is None or dim % len(self._shape(x) or (0,)) == xv.axis):
            self._fix(xv.atoms, f"softmax over channels at '{where}'")
            return OPAQUE
        return xv

    def _split(self, node: fx.Node, x: Any, xv: Any, env, where: str) -> Any:
        self._fix_value(xv, f"{op_name(node)} at '{where}'")
        return OPAQUE

    def _passthrough(self, node: fx.Node, x: Any, xv: Any) -> Any:
        shape_in, shape_out = self._shape(x), self._shape(node)
        if isinstance(xv, Chan) and shape_in != shape_out:
            self._fix(xv.atoms, f"shape-changing {op_name(node)} at '{module_of(node)}'")
            return OPAQUE
        return xv if shape_out is not None else None

    def _spatial(self, node: fx.Node, x: Any, xv: Any, where: str, what: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, Chan):
            return OPAQUE if so is not None else None
        if si is None or so is None or len(si) != len(so) or xv.axis != 1 or si[1] != so[1]:
            self._fix(xv.atoms, f"{what} at '{where}' does not keep channels on dim 1")
            return OPAQUE
        return xv

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
            if isinstance(v, Chan) and self._shape(a) is not None
        ]
        if not tracked:
            return OPAQUE
        axes = {ax for _, ax in tracked}
        what = f"{op_name(node)} at '{where}'"
        if len(axes) > 1:
            for v, _ in tracked:
                self._fix(v.atoms, f"{what} mixes tensors whose channels lie on different dims")
            return OPAQUE
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
                if isinstance(v, Chan):
                    self._fix(v.atoms, f"{what} broadcasts one channel over {size}")
                continue
            if isinstance(v, Chan) and v.axis == local:
                atoms = v.atoms
            else:
                atoms = self._new(dim, f"{what} combines channels with an untracked tensor")
                if isinstance(v, Chan):
                    self._fix(v.atoms, f"{what} with channels on another dim")
            if result is None:
                result = atoms
            else:
                self._unify(result, atoms)
        if result is None:
            return OPAQUE
        return Chan(axis, result)

    def _visit_cat(self, node: fx.Node, env, where: str) -> Any:
        out_shape = self._shape(node)
        tensors_arg = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if out_shape is None or not isinstance(tensors_arg, (list, tuple)):
            raise GraphError(f"torch.cat in module '{where}': cannot read its tensor list")
        dim %= len(out_shape)
        parts = [(a, env.get(a)) for a in tensors_arg if isinstance(a, fx.Node)]
        tracked_axes = {v.axis for _, v in parts if isinstance(v, Chan)}
        if not tracked_axes:
            return OPAQUE
        what = f"torch.cat at '{where}'"
        if tracked_axes == {dim}:
            pieces = [
                self._chan(v, a, dim, f"{what} joins channels with an untracked tensor")
                for a, v in parts
            ]
            return Chan(dim, np.concatenate([p for p in pieces if p is not None]))
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
            return Chan(axis, result)
        for _, v in parts:
            self._fix_value(v, f"{what} mixes channel layouts")
        return OPAQUE

    def _flatten(self, node: fx.Node, x: Any, xv: Any, start: int, end: int, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, Chan):
            return OPAQUE if so is not None else None
        if si is None or so is None:
            self._fix(xv.atoms, f"flatten at '{where}'")
            return OPAQUE
        n = len(si)
        start, end = start % n, end % n
        a = xv.axis
        if a < start:
            return Chan(a, xv.atoms)
        if a > end:
            return Chan(a - (end - start), xv.atoms)
        inner = int(np.prod(si[a + 1 : end + 1], dtype=np.int64))
        outer = int(np.prod(si[start:a], dtype=np.int64))
        # one channel = `inner` consecutive features, repeated `outer` times (row-major order)
        atoms = np.tile(np.repeat(xv.atoms, inner), outer)  # (prod(si[start:end+1]),)
        return Chan(start, atoms)

    def _reshape(self, node: fx.Node, x: Any, xv: Any, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, Chan):
            return OPAQUE if so is not None else None
        if si is None or so is None:
            self._fix(xv.atoms, f"reshape at '{where}'")
            return OPAQUE
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
            f"{op_name(node)} {tuple(si)} -> {tuple(so)} at '{where}' (only flattening the "
            "trailing dims with -1 is understood)",
        )
        return OPAQUE

    def _move_axis(self, node: fx.Node, x: Any, xv: Any, what: str, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, Chan) or si is None or so is None:
            return xv if not isinstance(xv, Chan) else OPAQUE
        rest = list(node.args[1:])
        if not all(isinstance(r, int) for r in rest) or node.kwargs:
            self._fix(xv.atoms, f"{what} with non-constant dims at '{where}'")
            return OPAQUE
        n, a = len(si), xv.axis
        if what == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = [d % n for d in dims]
            return Chan(dims.index(a), xv.atoms)
        if what == "transpose":
            d0, d1 = rest[0] % n, rest[1] % n
            return Chan(d1 if a == d0 else d0 if a == d1 else a, xv.atoms)
        d = rest[0] % (n + 1)  # unsqueeze
        return Chan(a + 1 if d <= a else a, xv.atoms)

    def _reduce(self, node: fx.Node, x: Any, xv: Any, where: str) -> Any:
        si, so = self._shape(x), self._shape(node)
        if not isinstance(xv, Chan):
            return OPAQUE if so is not None else None
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if si is None or so is None or dims is None:
            self._fix(xv.atoms, f"{op_name(node)} over all dims at '{where}'")
            return OPAQUE
        n = len(si)
        dims = [d % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if xv.axis in dims:
            self._fix(xv.atoms, f"{op_name(node)} over the channel dim at '{where}'")
            return OPAQUE
        return Chan(xv.axis if keep else xv.axis - sum(d < xv.axis for d in dims), xv.atoms)

    def _visit_getitem(self, node: fx.Node, x: Any, xv: Any, where: str) -> Any:
        if self._shape(x) is not None and isinstance(xv, Chan):  # slicing a tracked tensor
            self._fix(xv.atoms, f"indexing/slicing at '{where}'")
            return OPAQUE
        if self._shape(node) is None and not isinstance(node.meta.get("tensor_meta"), tuple):
            return None
        return OPAQUE


_PASS_KINDS = ("relu", "relu6", "activation", "dropout", "identity")
_SPATIAL_KINDS = ("maxpool", "avgpool", "adaptive_maxpool", "adaptive_avgpool", "resize")
W = ChannelWalker

# op kind (nncompress.core.fx.op_kind) -> rule(walker, node, x, xv, env, where)
_OP_RULES: dict[str | None, Callable[..., Any]] = {
    **{k: lambda w, n, x, xv, env, where: w._passthrough(n, x, xv) for k in _PASS_KINDS},
    **{
        k: lambda w, n, x, xv, env, where: w._spatial(n, x, xv, where, op_name(n))
        for k in _SPATIAL_KINDS
    },
    "add": lambda w, n, x, xv, env, where: w._elementwise(n, env, where),
    "arith": lambda w, n, x, xv, env, where: w._elementwise(n, env, where),
    "cat": lambda w, n, x, xv, env, where: w._visit_cat(n, env, where),
    "flatten": W._flatten_op,
    "reshape": lambda w, n, x, xv, env, where: w._reshape(n, x, xv, where),
    "move_axis": lambda w, n, x, xv, env, where: w._move_axis(
        n, x, xv, str(getattr(n.target, "__name__", n.target)), where
    ),
    "reduce": lambda w, n, x, xv, env, where: w._reduce(n, x, xv, where),
    "softmax": W._softmax_op,
    "split": W._split,
}

# module kind -> rule(walker, node, name, module, x, xv)
_MODULE_RULES: dict[str | None, Callable[..., Any]] = {
    "conv": W._conv,
    "linear": W._linear,
    "batchnorm": W._batchnorm,
    "layernorm": W._layernorm,
    **{k: lambda w, n, name, m, x, xv: w._passthrough(n, x, xv) for k in _PASS_KINDS},
    "prelu": W._prelu,
    **{
        k: lambda w, n, name, m, x, xv: w._spatial(n, x, xv, name, type(m).__name__)
        for k in _SPATIAL_KINDS
    },
    "flatten": lambda w, n, name, m, x, xv: w._flatten(n, x, xv, m.start_dim, m.end_dim, name),
    "softmax": W._softmax_module,
    "groupnorm": W._groupnorm,
}
