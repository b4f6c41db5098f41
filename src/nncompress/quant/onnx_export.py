"""Integer deployment through ONNX: export a quantized model in QDQ form and run it with ORT.

Why the graph is built here with ``onnx.helper`` from the ``torch.fx`` graph instead of
``torch.onnx.export``: torch 2.13's exporter defaults to the dynamo path (which needs the extra
``onnxscript`` package) and neither path knows our fake-quant modules; writing the nodes
ourselves puts every QuantizeLinear/DequantizeLinear exactly where the PyTorch simulation
quantizes, stores weights as real int8 / packed int4 initializers, and keeps the supported set
explicit (Conv, Linear, ReLU, pooling, Add, Flatten, BatchNorm). Anything else raises an error
naming the module or function.

Format (ONNX opset 21, "QDQ"): a quantized layer reads ``DequantizeLinear(int8 weight, per-channel
scale)`` and ``DequantizeLinear(int32 bias, scale = s_in * s_w)``, its input comes from a
``DequantizeLinear`` and its output (after a fused ReLU) goes to a ``QuantizeLinear``. ONNX
Runtime recognises these patterns and runs QLinearConv / QGemm / QLinearAdd /
QLinearGlobalAveragePool integer kernels (int8 x int8 accumulated in int32); ReLU disappears into
the output quantization (its zero point equals ``qmin``). INT4 weights are stored as opset-21
``INT4`` tensors (two per byte, so the file is ~8x smaller than fp32); ONNX Runtime has no int4
convolution/GEMM kernel for this pattern, so those layers dequantize their weights to float at
session start and run in float (the benefit is size, not speed) - see docs/quantization.md.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torch.nn.utils import parametrize

from ..core.errors import NncompressError
from ..core.files import atomic_write
from ..core.fx import TraceError, op_kind, trace
from ..core.modules import strip_parametrizations_
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
from .primitives import QParams, pack_int4, quantize_affine

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
_ONNX_DTYPE = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}
_NP_DTYPE = {"int8": np.int8, "uint8": np.uint8}


class ExportError(NncompressError, ValueError):
    """The model contains an operation the ONNX exporter does not support."""


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        # tensor name -> (scale name, zero-point name, QParams) for DequantizeLinear outputs
        self.qinfo: dict[str, tuple[str, str, QParams]] = {}
        # DequantizeLinear output -> its QuantizeLinear output; which ones have a consumer
        self.dq_src: dict[str, str] = {}
        self.used: set[str] = set()

    def use(self, x: str) -> str:
        """Name of ``x`` for one more consumer: every consumer of a quantized tensor gets its own
        DequantizeLinear (onnxruntime fuses a DQ into one QLinear* node only)."""
        if x not in self.dq_src:
            return x
        if x not in self.used:
            self.used.add(x)
            return x
        s, z, qp = self.qinfo[x]
        dq = self.node("DequantizeLinear", [self.dq_src[x], s, z], f"{x}_dup")
        self.qinfo[dq] = (s, z, qp)
        self.dq_src[dq] = self.dq_src[x]
        self.used.add(dq)
        return dq

    def fresh(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def init_int4(self, base: str, q: torch.Tensor, dtype: str) -> str:
        name = self.fresh(base)
        packed = pack_int4(q).numpy().tobytes()
        self.inits.append(
            helper.make_tensor(name, _ONNX_DTYPE[dtype], list(q.shape), packed, raw=True)
        )
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def qdq(self, x: str, qp: QParams, base: str) -> str:
        """Quantize ``x`` with ``qp`` and dequantize it again (an integer tensor in between)."""
        s = self.init(f"{base}_scale", qp.scale.numpy().astype(np.float32))
        z = self.init(f"{base}_zp", qp.zero_point.numpy().astype(_NP_DTYPE[qp.dtype]))
        q = self.node("QuantizeLinear", [x, s, z], f"{base}_q")
        dq = self.node("DequantizeLinear", [q, s, z], f"{base}_dq")
        self.qinfo[dq] = (s, z, qp)
        self.dq_src[dq] = q
        return dq

    def requant(self, src: str, out: str, base: str) -> str:
        """Re-attach ``src``'s quantization to ``out`` (grid-preserving ops: pool, flatten)."""
        if src not in self.qinfo:
            return out
        s, z, qp = self.qinfo[src]
        q = self.node("QuantizeLinear", [out, s, z], f"{base}_q")
        dq = self.node("DequantizeLinear", [q, s, z], f"{base}_dq")
        self.qinfo[dq] = (s, z, qp)
        self.dq_src[dq] = q
        return dq


def _weight_quant(mod: nn.Module) -> WeightFakeQuant | None:
    if parametrize.is_parametrized(mod, "weight"):
        for p in mod.parametrizations.weight:
            if isinstance(p, WeightFakeQuant):
                return p
    return None


def _layer_weight(b: _Builder, mod: nn.Module, name: str, x: str) -> tuple[str, str | None]:
    """Emit the weight (and bias) of a Conv/Linear; returns their tensor names."""
    wq = _weight_quant(mod)
    bias = mod.bias.detach().float() if mod.bias is not None else None
    if wq is None:
        w = mod.weight.detach().float()
        wname = b.init(f"{name}_weight", w.numpy())
        bname = b.init(f"{name}_bias", bias.numpy()) if bias is not None else None
        return wname, bname
    raw = mod.parametrizations.weight.original.detach().float()
    w = wq._masked(raw)  # (C_out, ...)
    qp = wq.qparams(raw)
    q = quantize_affine(
        w, qp.scale, qp.zero_point, qp.dtype, axis=qp.axis, reduce_range=qp.reduce_range
    )  # (C_out, ...)
    if qp.bits == 4:
        qname = b.init_int4(f"{name}_weight_q", q, qp.dtype)
    else:
        qname = b.init(f"{name}_weight_q", q.numpy())
    sname = b.init(f"{name}_weight_scale", qp.scale.numpy().astype(np.float32))
    zname = b.init(f"{name}_weight_zp", np.zeros(qp.scale.shape, np.int8))
    if qp.bits == 4:  # zero point must have the weight's element type
        b.inits.pop()
        b.inits.append(
            helper.make_tensor(
                zname,
                _ONNX_DTYPE[qp.dtype],
                list(qp.scale.shape),
                pack_int4(torch.zeros(qp.scale.shape, dtype=torch.int8)).numpy().tobytes(),
                raw=True,
            )
        )
    axis = {"axis": 0} if qp.axis is not None else {}
    wname = b.node("DequantizeLinear", [qname, sname, zname], f"{name}_weight", **axis)
    bname = None
    if bias is not None:
        if x in b.qinfo:
            # int32 bias with scale s_in * s_w (zero point 0), the pattern ORT fuses
            s_in = b.qinfo[x][2].scale
            bscale = (s_in * qp.scale).float()  # (C_out,) or ()
            qb = torch.round(bias / bscale).clamp(-(2**31), 2**31 - 1).to(torch.int32)
            qbn = b.init(f"{name}_bias_q", qb.numpy())
            bsn = b.init(f"{name}_bias_scale", bscale.numpy().astype(np.float32))
            bzn = b.init(f"{name}_bias_zp", np.zeros(bscale.shape, np.int32))
            bname = b.node("DequantizeLinear", [qbn, bsn, bzn], f"{name}_bias", **axis)
        else:
            bname = b.init(f"{name}_bias", bias.numpy())
    return wname, bname


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [int(v), int(v)]


def _module_node(b: _Builder, mod: nn.Module, name: str, x: str) -> str:
    if isinstance(mod, nn.Conv2d):
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            raise ExportError(
                f"module '{name}': Conv2d padding={mod.padding!r}, padding_mode="
                f"{mod.padding_mode!r} not supported (need integer padding, 'zeros')"
            )
        w, bias = _layer_weight(b, mod, name, x)
        ph, pw = mod.padding
        inputs = [x, w] + ([bias] if bias else [])
        return b.node(
            "Conv",
            inputs,
            name,
            kernel_shape=list(mod.kernel_size),
            strides=list(mod.stride),
            pads=[ph, pw, ph, pw],
            dilations=list(mod.dilation),
            group=mod.groups,
        )
    if isinstance(mod, nn.Linear):
        w, bias = _layer_weight(b, mod, name, x)
        inputs = [x, w] + ([bias] if bias else [])
        return b.node("Gemm", inputs, name, transB=1)
    if isinstance(mod, ActivationQuantizer):
        if mod.mode != "quantize":
            raise ExportError(f"module '{name}': quantizer not converted; call convert() first")
        return b.qdq(x, mod.qparams(), name)
    if isinstance(mod, nn.ReLU):
        return b.requant(x, b.node("Relu", [x], name), name)
    if isinstance(mod, nn.MaxPool2d):
        if mod.return_indices:
            raise ExportError(f"module '{name}': MaxPool2d(return_indices=True) not supported")
        ph, pw = _pair(mod.padding)
        out = b.node(
            "MaxPool",
            [x],
            name,
            kernel_shape=_pair(mod.kernel_size),
            strides=_pair(mod.stride or mod.kernel_size),
            pads=[ph, pw, ph, pw],
            dilations=_pair(mod.dilation),
            ceil_mode=int(mod.ceil_mode),
        )
        return b.requant(x, out, name)
    if isinstance(mod, nn.AvgPool2d):
        ph, pw = _pair(mod.padding)
        return b.node(
            "AveragePool",
            [x],
            name,
            kernel_shape=_pair(mod.kernel_size),
            strides=_pair(mod.stride or mod.kernel_size),
            pads=[ph, pw, ph, pw],
            ceil_mode=int(mod.ceil_mode),
            count_include_pad=int(mod.count_include_pad),
        )
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        if _pair(mod.output_size) != [1, 1]:
            raise ExportError(
                f"module '{name}': AdaptiveAvgPool2d(output_size={mod.output_size}) not "
                "supported (only 1, i.e. global average pooling)"
            )
        return b.node("GlobalAveragePool", [x], name)
    if isinstance(mod, nn.Flatten):
        if mod.end_dim != -1:
            raise ExportError(f"module '{name}': Flatten(end_dim={mod.end_dim}) not supported")
        return b.requant(x, b.node("Flatten", [x], name, axis=mod.start_dim), name)
    if isinstance(mod, nn.BatchNorm2d):
        arrays = [
            mod.weight if mod.affine else torch.ones(mod.num_features),
            mod.bias if mod.affine else torch.zeros(mod.num_features),
            mod.running_mean,
            mod.running_var,
        ]
        names = [
            b.init(f"{name}_{k}", t.detach().float().numpy())
            for k, t in zip(("scale", "bias", "mean", "var"), arrays, strict=True)
        ]
        return b.node("BatchNormalization", [x, *names], name, epsilon=mod.eps)
    raise ExportError(
        f"module '{name}' of type {type(mod).__name__} is not supported by the ONNX exporter "
        "(supported: Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, "
        "BatchNorm2d, Dropout, Identity)"
    )


def _arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    model = copy.deepcopy(model).eval()
    fold_batchnorm_(model)
    strip_parametrizations_(model)
    try:
        return trace(model)
    except TraceError as exc:
        raise ExportError(str(exc)) from exc


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an ONNX (opset 21) file with a dynamic batch dimension.

    ``model`` is either a model from :func:`~nncompress.quant.linear.quantize_ptq` /
    :func:`~nncompress.quant.linear.convert` (written in QDQ form with integer initializers) or any
    float model built from the supported layers (BatchNorm folded into the convolutions, written
    in fp32). ``input_shape`` excludes the batch, e.g. ``(1, 28, 28)``. ``metadata`` (values
    JSON-encoded unless strings) goes into the model's ``metadata_props`` - store the dataset
    name and normalisation there so ``nncompress eval model.onnx`` can find its data.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"path='{path}': an ONNX file must end in .onnx")
    gm = _trace(model)
    mods = dict(gm.named_modules())
    with torch.no_grad():
        was = gm.training
        gm.eval()
        out_shape = [int(d) for d in gm(torch.zeros(1, *input_shape)).shape[1:]]
        gm.train(was)
    b = _Builder()
    env: dict[fx.Node, Any] = {}
    inputs, outputs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if inputs:
                raise ExportError("export_onnx supports models with a single input")
            name = b.fresh("input")
            inputs.append(
                helper.make_tensor_value_info(
                    name, TensorProto.FLOAT, ["batch", *[int(d) for d in input_shape]]
                )
            )
            env[node] = name
        elif _relu_absorbed(node, mods):
            # Relu followed by QuantizeLinear with zero_point == qmin: the quantizer's clamp
            # already maps negatives to 0, so the Relu is dropped (lets ORT fuse Add/Conv + Q)
            env[node] = env[node.args[0]]
        elif node.op == "call_module":
            mod = mods[node.target]
            x = env[node.args[0]]
            if isinstance(mod, nn.Identity | nn.Dropout):
                env[node] = x
                continue
            env[node] = _module_node(b, mod, node.target, b.use(x))
        elif node.op == "call_function" or node.op == "call_method":
            env[node] = _function_node(b, node, env)
        elif node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node):
                raise ExportError("export_onnx supports models with a single tensor output")
            out = b.node("Identity", [b.use(env[res])], "logits")
            outputs.append(
                helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", *out_shape])
            )
        elif node.op == "get_attr":
            raise ExportError(f"graph attribute '{node.target}' is not supported")
    graph = helper.make_graph(b.nodes, "nncompress", inputs, outputs, b.inits)
    model_proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="nncompress",
    )
    model_proto.ir_version = 10
    meta = {
        k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        for k, v in (metadata or {}).items()
    }
    meta.setdefault("input_shape", json.dumps([int(d) for d in input_shape]))
    helper.set_model_props(model_proto, meta)
    onnx.checker.check_model(model_proto)
    blob = model_proto.SerializeToString()
    atomic_write(path, lambda tmp: tmp.write_bytes(blob))
    log.info("wrote %s (%d bytes, %d nodes)", path, len(blob), len(b.nodes))
    return path


def _relu_absorbed(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """A ReLU whose only user is a converted quantizer with ``zero_point == qmin``."""
    if op_kind(node, mods) != "relu" or len(node.users) != 1:
        return False
    user = next(iter(node.users))
    q = mods.get(user.target) if user.op == "call_module" else None
    if not isinstance(q, ActivationQuantizer) or q.mode != "quantize":
        return False
    qp = q.qparams()
    return int(qp.zero_point) == qp.qmin


def _function_node(b: _Builder, node: fx.Node, env: dict) -> Any:
    kind, t, args = op_kind(node, {}), node.target, node.args
    if kind == "shape":
        return None  # only used by view/reshape(x.size(0), -1)
    if kind == "flatten":
        start = _arg(node, 1, "start_dim", 0)
        end = _arg(node, 2, "end_dim", -1)
        if end != -1:
            raise ExportError(f"{node.name}: flatten(end_dim={end}) not supported")
        x = b.use(env[args[0]])
        return b.requant(x, b.node("Flatten", [x], node.name, axis=start), node.name)
    if kind == "reshape":
        shape = list(args[1:]) if node.op == "call_method" else list(args[1])
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = list(shape[0])
        if len(shape) == 2 and shape[1] == -1:
            x = b.use(env[args[0]])
            return b.requant(x, b.node("Flatten", [x], node.name, axis=1), node.name)
        raise ExportError(f"{node.name}: {t} to shape {shape} not supported (only (N, -1))")
    if kind == "relu":
        x = b.use(env[args[0]])
        return b.requant(x, b.node("Relu", [x], node.name), node.name)
    if kind == "add":
        if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
            raise ExportError(f"{node.name}: add is supported between two tensors only")
        return b.node("Add", [b.use(env[args[0]]), b.use(env[args[1]])], node.name)
    if kind in ("identity", "dropout"):
        return env[args[0]]
    raise ExportError(
        f"{node.name}: function/method {getattr(t, '__name__', t)!r} is not supported by the "
        "ONNX exporter (supported: flatten, view/reshape to (N, -1), relu, add)"
    )
