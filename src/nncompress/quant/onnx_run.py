"""Running exported ONNX models with onnxruntime: sessions, accuracy, latency, per-file stats."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from ..core.progress import progress_task

__all__ = ["evaluate_onnx", "make_session", "measure_onnx_latency", "onnx_metadata", "onnx_stats"]


def _int4_only(path: str | Path) -> bool:
    """True when the file's quantized weights are all 4-bit (no 8-bit weight initializers)."""
    m = onnx.load(str(path), load_external_data=False)
    dq_inputs = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    kinds = {t.data_type for t in m.graph.initializer if t.name in dq_inputs and len(t.dims) > 1}
    four = {TensorProto.INT4, TensorProto.UINT4}
    return bool(kinds & four) and not (kinds - four)


def make_session(path: str | Path, threads: int = 1, *, fold_int4: bool | None = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads (inter-op: 1), all graph
    optimisations on (they are what turn QDQ patterns into integer kernels).

    ``fold_int4`` (default: automatic, when every quantized weight is 4-bit): turn off
    onnxruntime's QDQ fusion so that it constant-folds the int4 weights into float once at
    session start. onnxruntime has no int4 convolution/GEMM kernel for these patterns, and with
    fusion on it would dequantize the weights on every run.
    """
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads={threads}: must be >= 1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if fold_int4 is None:
        fold_int4 = _int4_only(path)
    if fold_int4:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, JSON values decoded."""
    m = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def evaluate_onnx(
    path_or_session: Any,
    loader: Iterable,
    *,
    threads: int = 1,
    progress: Any = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of an ONNX model over ``(x, y)`` batches."""
    sess = (
        make_session(path_or_session, threads)
        if isinstance(path_or_session, str | Path)
        else path_or_session
    )
    in_name = sess.get_inputs()[0].name
    correct, total, loss_sum = 0, 0, 0.0
    n = len(loader) if hasattr(loader, "__len__") else None
    with progress_task(progress, "evaluate (onnxruntime)", n) as task:
        for i, (x, y) in enumerate(loader):
            logits = sess.run(None, {in_name: x.numpy().astype(np.float32)})[0]
            out = torch.from_numpy(logits)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
            task.advance(i + 1)
    if total == 0:
        raise ValueError("evaluate_onnx: the loader yielded no samples")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "samples": total}


def measure_onnx_latency(
    sess: Any,
    input_shape: tuple[int, ...],
    batch: int,
    *,
    repeats: int = 50,
    warmup: int = 5,
    seed: int = 0,
) -> float:
    """Median wall time (ms) of one ``sess.run`` on a random batch; warm-up runs excluded."""
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape)).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


_ELEM_BITS = {
    TensorProto.FLOAT: 32,
    TensorProto.INT8: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT32: 32,
    TensorProto.INT64: 64,
    TensorProto.FLOAT16: 16,
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
}


def _graph_macs(model: onnx.ModelProto) -> int | None:
    """MACs per sample of Conv/Gemm/MatMul nodes, from shapes inferred at batch 1."""
    m = copy.deepcopy(model)
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # shape inference is best effort
        return None
    shapes = {}
    for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value for d in dims]
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    # weights reached through DequantizeLinear keep their initializer's shape
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in shapes:
            shapes.setdefault(n.output[0], shapes[n.input[0]])
    total = 0
    for n in m.graph.node:
        if n.op_type in ("Conv", "QLinearConv", "ConvInteger"):
            w = shapes.get(n.input[1] if n.op_type != "QLinearConv" else n.input[3])
            out = shapes.get(n.output[0])
            if not w or not out or 0 in out:
                return None
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            w = shapes.get(n.input[1])
            if not w:
                return None
            total += int(np.prod(w))
    return total


def onnx_stats(
    path: str | Path,
    *,
    batches: tuple[int, ...] = (1, 64),
    repeats: int = 50,
    threads: int = 1,
) -> dict[str, Any]:
    """File bytes, initializer dtypes/bytes, graph MACs and measured onnxruntime latency."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inits = []
    by_dtype: dict[str, int] = {}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        bits = _ELEM_BITS.get(t.data_type)
        nbytes = len(t.raw_data) if t.raw_data else (n * bits + 7) // 8 if bits else 0
        dt = TensorProto.DataType.Name(t.data_type).lower()
        inits.append({"name": t.name, "dtype": dt, "shape": list(t.dims), "bytes": nbytes})
        by_dtype[dt] = by_dtype.get(dt, 0) + nbytes
    meta = onnx_metadata(path)
    shape = tuple(meta.get("input_shape") or ())
    latency = {}
    if shape and batches:
        sess = make_session(path, threads)
        for bsz in batches:
            latency[f"batch_{bsz}"] = measure_onnx_latency(sess, shape, bsz, repeats=repeats)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "initializer_bytes": sum(by_dtype.values()),
        "bytes_by_dtype": by_dtype,
        "initializers": inits,
        "ops": ops,
        "macs": _graph_macs(model),
        "input_shape": list(shape),
        "latency_ms": latency,
        "threads": threads,
        "metadata": meta,
    }
