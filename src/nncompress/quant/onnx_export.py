"""Integer deployment through ONNX: export a quantized model in QDQ form and run it with ORT.

The graph comes from ``torch.onnx.export`` (the TorchScript exporter, which needs no extra
package), so every operator torch and onnxruntime support exports: zero padding, ReLU6 (``Clip``),
SiLU (``Sigmoid`` + ``Mul``), Hardswish, squeeze-and-excitation gates, residual additions,
``nn.Conv2d`` subclasses that pad in their own ``forward``, and so on. Nothing is whitelisted.

How the quantized model becomes a QDQ file (ONNX opset 21):

1. An export copy of the fake-quantized ``GraphModule`` replaces every
   :class:`~.fakequant.ActivationQuantizer` by ``torch.fake_quantize_per_tensor_affine`` with its
   frozen scale and zero point, and every weight by its dequantized value ``scale * q`` behind
   ``torch.fake_quantize_per_channel_affine`` (or per tensor); the exporter writes both as
   ``QuantizeLinear`` -> ``DequantizeLinear`` pairs at exactly the places the PyTorch
   simulation quantizes.
2. A pass over the ONNX graph folds every ``QuantizeLinear`` of a constant weight into an
   integer initializer (``INT8``, or ``INT4`` packed two per byte for 4-bit layers) read by the
   ``DequantizeLinear``, and turns the float bias of a Conv / Gemm whose input and weight are
   dequantized into an ``INT32`` initializer with scale ``s_in * s_w`` (zero point 0) - the
   pattern onnxruntime fuses into ``QLinearConv`` / ``QGemm``. The file then holds no float
   weights.

onnxruntime (CPU) fuses the QDQ patterns into integer kernels (``QLinearConv`` for regular and
depthwise convolutions, ``QGemm``, ``QLinearAdd``, ``QLinearMul``, ``QLinearGlobalAveragePool``,
``QLinearSigmoid``) and drops a ``Relu`` / ``Clip`` (ReLU, ReLU6) before a ``QuantizeLinear``
whose range it contains; anything else runs in float between a ``DequantizeLinear`` and a
``QuantizeLinear``. INT4 layers have no integer kernel (see :mod:`.onnx_run`).

Why not onnxruntime's own ``quantize_static`` on the exported float graph: it calibrates its
own ranges, so the file would not be the model the PyTorch simulation (and QAT) optimised;
``benchmarks/mobile.py`` measures both on MobileNetV2 (accuracy and latency) and
docs/quantization.md gives the numbers.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torch.nn.utils import parametrize

from ..core.convs import ConvForm, conv_form, is_conv_leaf, is_conv_subclass
from ..core.errors import NncompressError
from ..core.files import atomic_write
from ..core.fx import TraceError
from ..core.modules import set_submodule, strip_parametrizations_
from .fakequant import ActivationQuantizer, WeightFakeQuant
from .fold import fold_batchnorm_
from .onnx_run import _int4_only as _int4_only  # re-exported (running the exported files)
from .onnx_run import (
    evaluate_onnx,
    make_session,
    measure_onnx_latency,
    onnx_metadata,
    onnx_stats,
)
from .primitives import pack_int4, qrange, quantize_affine

__all__ = [
    "OPSET",
    "ExportError",
    "evaluate_onnx",
    "export_onnx",
    "make_session",
    "measure_onnx_latency",
    "onnx_metadata",
    "onnx_stats",
]

log = logging.getLogger(__name__)
OPSET = 21
_EXPORT_OPSET = 20  # the TorchScript exporter's newest


class ExportError(NncompressError, ValueError):
    """The model cannot be exported to ONNX (the message names the operation or module)."""


# --------------------------------------------------------------------------------------------
# the export copy: quantizers as torch's fake-quantize ops (exported as QuantizeLinear /
# DequantizeLinear)
# --------------------------------------------------------------------------------------------


class _ActQDQ(nn.Module):
    """A frozen activation quantizer as ``torch.fake_quantize_per_tensor_affine``."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.qmin, self.qmax
        )


class _WeightQDQ(nn.Module):
    """Parametrization ``w -> fake_quantize(w)`` with fixed symmetric scales: ``w`` already
    holds ``scale * q``, so the exported QuantizeLinear recovers ``q`` exactly."""

    def __init__(self, scale: torch.Tensor, per_channel: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale.float().reshape(-1).clone())
        self.per_channel = per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # the exporter accepts the (-128, 127) range only; int8 and int4 grids lie inside it
        if self.per_channel:
            zp = torch.zeros(self.scale.shape, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, self.scale, zp, 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(w, float(self.scale[0]), 0, -128, 127)


def _weight_quant(mod: nn.Module) -> WeightFakeQuant | None:
    if parametrize.is_parametrized(mod, "weight"):
        for p in mod.parametrizations.weight:
            if isinstance(p, WeightFakeQuant):
                return p
    return None


@torch.no_grad()
def _export_copy(gm: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """A copy of a quantized model with torch fake-quantize ops in place of our quantizers;
    returns it and ``{weight parameter name: bits}`` of the quantized weights."""
    out = copy.deepcopy(gm).eval()
    bits: dict[str, int] = {}
    for name, mod in list(out.named_modules()):
        if isinstance(mod, ActivationQuantizer):
            if mod.mode != "quantize":
                raise ExportError(
                    f"module '{name}': activation quantizer not converted; call convert_() first"
                )
            qp = mod.qparams()
            qmin, qmax = qrange(qp.dtype)
            set_submodule(out, name, _ActQDQ(float(qp.scale), int(qp.zero_point), qmin, qmax))
            continue
        wq = _weight_quant(mod)
        if wq is None:
            continue
        raw = mod.parametrizations.weight.original.detach().float()
        w = wq._masked(raw)  # (C_out, ...)
        qp = wq.qparams(raw)
        q = quantize_affine(
            w, qp.scale, qp.zero_point, qp.dtype, axis=qp.axis, reduce_range=qp.reduce_range
        )  # (C_out, ...) integers
        scale = qp.scale.float()
        shape = (-1,) + (1,) * (q.dim() - 1) if qp.axis is not None else ()
        deq = q.float() * scale.reshape(shape)  # (C_out, ...) = scale * q exactly
        strip_parametrizations_(mod)
        mod.weight = nn.Parameter(deq, requires_grad=False)
        parametrize.register_parametrization(
            mod, "weight", _WeightQDQ(scale, qp.axis is not None), unsafe=True
        )
        bits[f"{name}.parametrizations.weight.original"] = qp.bits
    return out, bits


def _float_copy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model).eval()
    try:
        fold_batchnorm_(out)  # onnxruntime fuses BatchNorm too; folding keeps the file smaller
    except (TraceError, ValueError):
        strip_parametrizations_(out)
    return out


def _padded_forward(pad: tuple[int, ...], padding: tuple[int, ...]):
    def forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if any(pad):
            x = F.pad(x, list(pad))  # constant amounts: one Pad node the Conv absorbs
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    return forward


@torch.no_grad()
def _freeze_conv_padding_(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Give every recognised conv subclass (padding computed in its ``forward``) a forward with
    its padding for ``input_shape`` as constants, so the exporter writes ``Pad`` with constant
    amounts (folded into the ``Conv`` by :func:`_fold_pads`) instead of shape arithmetic."""
    subs = {
        id(m): m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and is_conv_subclass(m) and is_conv_leaf(m)
    }
    if not subs:
        return 0
    shapes: dict[int, tuple[int, ...]] = {}

    def record(mod: nn.Module, args: tuple) -> None:
        shapes.setdefault(id(mod), tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in subs.values()]
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    done = 0
    for key, m in subs.items():
        if key not in shapes:
            continue
        form = conv_form(m, tuple(shapes[key][1:]))
        if isinstance(form, ConvForm):
            m.forward = types.MethodType(_padded_forward(form.pad, form.padding), m)
            done += 1
    return done


# --------------------------------------------------------------------------------------------
# the ONNX pass: integer initializers for quantized weights, int32 biases
# --------------------------------------------------------------------------------------------


class _Graph:
    """Lookups over an ONNX graph: constants (initializers and Constant nodes), producers and
    consumers of every tensor."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.consts: dict[str, np.ndarray] = {}
        for n in self.g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.names = {*self.inits, *self.producer, *(i.name for i in self.g.input)}

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return self.consts.get(name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def add_init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def add_int4(self, base: str, q: np.ndarray) -> str:
        name = self.fresh(base)
        packed = pack_int4(torch.from_numpy(q.astype(np.int8))).numpy().tobytes()
        t = helper.make_tensor(name, TensorProto.INT4, list(q.shape), packed, raw=True)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name


def _attr(node: onnx.NodeProto, key: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return default


def _layer_of(param: str) -> str:
    for suffix in (".parametrizations.weight.original", ".weight"):
        if param.endswith(suffix):
            return param[: -len(suffix)]
    return param


def _integer_weights(model: onnx.ModelProto, bits: Mapping[str, int]) -> int:
    """Fold ``QuantizeLinear(constant float weight)`` into integer initializers; returns how
    many weights were folded."""
    G = _Graph(model)  # noqa: N806
    remove: list[onnx.NodeProto] = []
    done = 0
    for q in list(G.g.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in G.inits:
            continue
        w = G.value(q.input[0])
        scale, zp = G.value(q.input[1]), G.value(q.input[2]) if len(q.input) > 2 else None
        dqs = G.consumers.get(q.output[0], [])
        if w is None or w.dtype != np.float32 or w.ndim < 2 or scale is None or zp is None:
            continue
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        axis = _attr(q, "axis", 1) % w.ndim
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        qv = np.rint(w / scale.reshape(shape)).astype(np.int64) + zp.astype(np.int64).reshape(shape)
        qv = np.clip(qv, -128, 127)  # (C_out, ...)
        nbits = bits.get(q.input[0]) or (4 if np.abs(qv).max() <= 7 else 8)
        base = _layer_of(q.input[0]).replace(".", "_") + "_weight"
        if nbits == 4:
            qname = G.add_int4(f"{base}_q", qv)
            zname = G.add_int4(f"{base}_zp", np.zeros(scale.shape, np.int8))
        else:
            qname = G.add_init(f"{base}_q", qv.astype(np.int8))
            zname = None
        for d in dqs:
            d.input[0] = qname
            if zname is not None:
                d.input[2] = zname
        remove.append(q)
        done += 1
    for n in remove:
        G.g.node.remove(n)
    _drop_unused(model)
    return done


def _dq_scale(G: _Graph, name: str) -> tuple[np.ndarray, onnx.NodeProto] | None:  # noqa: N803
    """Scale of the DequantizeLinear producing ``name`` (``None`` if it is not one)."""
    n = G.producer.get(name)
    if n is None or n.op_type != "DequantizeLinear":
        return None
    s = G.value(n.input[1])
    return (s, n) if s is not None else None


def _integer_biases(model: onnx.ModelProto) -> int:
    """Float biases of Conv / Gemm nodes with dequantized inputs and integer weights become
    ``INT32`` initializers behind a DequantizeLinear with scale ``s_in * s_w``."""
    G = _Graph(model)  # noqa: N806
    done = 0
    for n in list(G.g.node):
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in G.inits:
            continue
        if n.op_type == "Gemm" and (_attr(n, "transB", 0) != 1 or _attr(n, "transA", 0) != 0):
            continue
        x, w = _dq_scale(G, n.input[0]), _dq_scale(G, n.input[1])
        bias = G.value(n.input[2])
        if x is None or w is None or bias is None or bias.ndim != 1 or x[0].size != 1:
            continue
        if G.inits.get(w[1].input[0]) is None:  # weight must be a stored integer tensor
            continue
        bscale = (x[0].reshape(()) * w[0]).astype(np.float32)  # (C_out,) or ()
        qb = np.clip(np.rint(bias / bscale), -(2**31), 2**31 - 1).astype(np.int32)
        base = n.input[2].replace(".", "_")
        qn = G.add_init(f"{base}_q", qb)
        sn = G.add_init(f"{base}_scale", bscale)
        zn = G.add_init(f"{base}_zp", np.zeros(bscale.shape, np.int32))
        out = G.fresh(f"{base}_dq")
        attrs = {"axis": 0} if bscale.ndim else {}
        dq = helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=out, **attrs)
        idx = list(G.g.node).index(n)
        G.g.node.insert(idx, dq)
        n.input[2] = out
        done += 1
    _drop_unused(model)
    return done


# ops that map a quantized grid onto itself (the simulation's grid-keeping op kinds)
_GRID_OPS = ("MaxPool", "Flatten", "Reshape", "Relu", "Identity", "Dropout", "Squeeze",
             "Unsqueeze", "Transpose")  # fmt: skip


def _propagate_qdq(model: onnx.ModelProto) -> int:
    """Re-quantize the output of grid-keeping ops (max-pool, flatten, ...) whose input is
    dequantized, with the same scale and zero point: exact, and every integer layer then reads
    a DequantizeLinear directly (the pattern onnxruntime fuses; what its own QDQ propagation
    would insert). Returns how many pairs were added."""
    G = _Graph(model)  # noqa: N806
    added = 0
    nodes = list(G.g.node)
    for n in nodes:
        if n.op_type not in _GRID_OPS or not n.input:
            continue
        src = G.producer.get(n.input[0])
        if src is None or src.op_type != "DequantizeLinear" or len(src.input) < 3:
            continue
        users = G.consumers.get(n.output[0], [])
        if not users or all(u.op_type == "QuantizeLinear" for u in users):
            continue
        s, z = src.input[1], src.input[2]
        if G.value(s) is None or G.value(s).size != 1:  # per-tensor activations only
            continue
        base = n.output[0]
        qn, dqn = G.fresh(f"{base}_q"), G.fresh(f"{base}_dq")
        q = helper.make_node("QuantizeLinear", [base, s, z], [qn], name=qn)
        dq = helper.make_node("DequantizeLinear", [qn, s, z], [dqn], name=dqn)
        for u in users:
            for i, name in enumerate(u.input):
                if name == base:
                    u.input[i] = dqn
        idx = list(G.g.node).index(n)
        G.g.node.insert(idx + 1, dq)
        G.g.node.insert(idx + 1, q)
        G.producer[dqn] = dq
        G.producer[qn] = q
        G.consumers[base] = [q]
        G.consumers[dqn] = users
        added += 1
    return added


_ARITH_OPS = ("ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Gather",
              "Unsqueeze", "Squeeze", "Add", "Sub", "Mul", "Div", "Neg", "Range")  # fmt: skip


def _fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate the small integer arithmetic the TorchScript exporter leaves on constants (the
    ``pads`` input of ``F.pad``) with onnx's reference evaluator, and store the results as
    initializers; returns how many nodes were folded."""
    from onnx.reference import ReferenceEvaluator

    G = _Graph(model)  # noqa: N806
    known: dict[str, np.ndarray] = {}

    def const(name: str) -> np.ndarray | None:
        return known[name] if name in known else G.value(name)

    done = 0
    for n in list(G.g.node):
        if n.op_type not in _ARITH_OPS or any(
            a.type == onnx.AttributeProto.GRAPH for a in n.attribute
        ):
            continue
        vals = [const(i) if i else None for i in n.input]
        if any(v is None for v, i in zip(vals, n.input, strict=True) if i):
            continue
        if any(v is not None and v.size > 4096 for v in vals):
            continue
        inputs = [i for i in n.input if i]
        ins = [
            helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for i, v in zip(n.input, vals, strict=True)
            if i
        ]
        outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in n.output]
        g = helper.make_graph([n], "fold", ins, outs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", _EXPORT_OPSET)])
        try:
            res = ReferenceEvaluator(m).run(None, {i: const(i) for i in inputs})
        except Exception:  # noqa: BLE001 - not foldable: leave the node
            continue
        for o, r in zip(n.output, res, strict=True):
            known[o] = np.asarray(r)
        G.g.node.remove(n)
        done += 1
    for o, v in known.items():
        G.g.initializer.append(numpy_helper.from_array(v, o))
    _drop_unused(model)
    return done


def _fold_pads(model: onnx.ModelProto) -> int:
    """Merge ``Pad`` (constant zeros on the spatial dims, constant amounts) into the ``Conv``
    nodes reading it (ONNX Conv takes asymmetric ``pads``): the Conv then reads the
    DequantizeLinear directly and onnxruntime fuses it into ``QLinearConv``. Returns how many
    Pad nodes were folded."""
    G = _Graph(model)  # noqa: N806
    done = 0
    for n in list(G.g.node):
        if n.op_type != "Pad" or _attr(n, "mode", b"constant") not in (b"constant", "constant"):
            continue
        pads = G.value(n.input[1]) if len(n.input) > 1 else None
        value = G.value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(())
        users = G.consumers.get(n.output[0], [])
        if pads is None or value is None or float(np.asarray(value).reshape(-1)[0]) != 0.0:
            continue
        if len(n.input) > 3 and n.input[3]:  # explicit axes
            continue
        pads = [int(v) for v in np.asarray(pads).reshape(-1)]
        rank = len(pads) // 2
        if rank < 3 or any(pads[:2]) or any(pads[rank : rank + 2]) or min(pads) < 0:
            continue
        if not users or any(u.op_type != "Conv" or u.input[0] != n.output[0] for u in users):
            continue
        if any(_attr(u, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") for u in users):
            continue
        begin, end = pads[2:rank], pads[rank + 2 :]
        for u in users:
            old = list(_attr(u, "pads", [0] * (2 * (rank - 2))))
            new = [a + b for a, b in zip(old, begin + end, strict=True)]
            for a in list(u.attribute):
                if a.name == "pads":
                    u.attribute.remove(a)
            u.attribute.append(helper.make_attribute("pads", new))
            u.input[0] = n.input[0]
        G.g.node.remove(n)
        done += 1
    return done


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _torch_export(model: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    buf = io.BytesIO()
    x = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # the onnxscript package; it writes opset 20, which we relabel 21 (below)
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                buf,
                dynamo=False,
                opset_version=_EXPORT_OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; name the failure
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first}") from exc
    proto = onnx.load_from_string(buf.getvalue())
    # opset 21 only widens the types of the ops the exporter writes (INT4 for QuantizeLinear /
    # DequantizeLinear, Reshape, Flatten, ...); their semantics are those of opset 20
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = OPSET
    return proto


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an ONNX (opset 21) file with a dynamic batch dimension.

    ``model`` is either a model from :func:`~nncompress.quant.linear.quantize_ptq` /
    :func:`~nncompress.quant.linear.quantize_qat` (written in QDQ form with integer
    initializers, see the module docstring) or any float model ``torch.onnx.export`` can
    export (BatchNorm folded into the convolutions when the model traces with ``torch.fx``,
    written in fp32). ``input_shape`` excludes the batch, e.g. ``(1, 28, 28)``. ``metadata``
    (values JSON-encoded unless strings) goes into the model's ``metadata_props`` - store the
    dataset name and normalisation there so ``nncompress eval model.onnx`` can find its data.
    Raises :class:`ExportError` naming the operation the exporter could not write.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"path='{path}': an ONNX file must end in .onnx")
    quantized = isinstance(model, fx.GraphModule) and any(
        isinstance(m, ActivationQuantizer | WeightFakeQuant) for m in model.modules()
    )
    if quantized:
        exportable, bits = _export_copy(model)
    else:
        exportable, bits = _float_copy(model), {}
    _freeze_conv_padding_(exportable, tuple(input_shape))
    proto = _torch_export(exportable, tuple(input_shape))
    _fold_constants(proto)
    _fold_pads(proto)
    n_w = _integer_weights(proto, bits) if quantized else 0
    if quantized:
        _propagate_qdq(proto)
    n_b = _integer_biases(proto) if quantized else 0
    if len(proto.graph.input) != 1:
        raise ExportError("export_onnx supports models with a single tensor input")
    proto.producer_name = "nncompress"
    meta = {
        k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        for k, v in (metadata or {}).items()
    }
    meta.setdefault("input_shape", json.dumps([int(d) for d in input_shape]))
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    blob = proto.SerializeToString()
    atomic_write(path, lambda tmp: tmp.write_bytes(blob))
    log.info(
        "wrote %s (%d bytes, %d nodes, %d integer weights, %d int32 biases)",
        path,
        len(blob),
        len(proto.graph.node),
        n_w,
        n_b,
    )
    return path
