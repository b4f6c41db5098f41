"""INT8 integer inference of a transformer in onnxruntime: dynamic quantization of its MatMuls.

``export_onnx`` writes nncompress's own QDQ graphs from an fx trace, which Hugging Face models
defeat. For them, :func:`export_transformer_onnx` uses ``torch.onnx.export`` (the classic
TorchScript exporter first, the dynamo exporter where it fails) and
:func:`quantize_onnx_dynamic` applies onnxruntime's own dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``): weights of MatMul / Gemm become INT8 per
channel, activations are quantized per batch at run time (``DynamicQuantizeLinear`` +
``MatMulInteger``), the standard CPU recipe for BERT-class models. :func:`compare_onnx`
measures latency of PyTorch eager, fp32 onnxruntime and INT8 onnxruntime on the same batch
and the INT8 outputs' cosine to eager.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from ..engine.batches import main_output

__all__ = ["compare_onnx", "export_transformer_onnx", "quantize_onnx_dynamic"]

log = logging.getLogger(__name__)


class _Wrapped(nn.Module):
    """Calls the model with keyword inputs in a fixed order and returns its main tensor."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args, strict=True)))
        return main_output(out)


def export_transformer_onnx(
    model: nn.Module, example: Mapping[str, torch.Tensor], path: str | Path, *, opset: int = 17
) -> Path:
    """Export ``model(**example)``'s main output to ONNX with dynamic batch and sequence axes.

    Tries ``torch.onnx.export(dynamo=False)`` and falls back to the dynamo exporter; raises
    ConfigError with both messages when neither works.
    """
    path = Path(path)
    names = list(example)
    wrapped = _Wrapped(model, names).eval()
    args = tuple(example[n] for n in names)
    axes = {n: {0: "batch", 1: "seq"} if example[n].dim() >= 2 else {0: "batch"} for n in names}
    axes["output"] = {0: "batch"}
    errors = []
    for dynamo in (False, True):
        try:
            with torch.no_grad():
                torch.onnx.export(
                    wrapped,
                    args,
                    str(path),
                    input_names=names,
                    output_names=["output"],
                    dynamic_axes=axes if not dynamo else None,
                    dynamic_shapes=None,
                    opset_version=opset,
                    dynamo=dynamo,
                )
            return path
        except Exception as exc:  # noqa: BLE001 - both exporters are tried, errors reported
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {exc}")
            log.info("ONNX export (dynamo=%s) failed: %s", dynamo, exc)
    raise ConfigError("the model could not be exported to ONNX: " + " | ".join(errors))


def quantize_onnx_dynamic(src: str | Path, dst: str | Path, *, per_channel: bool = True) -> Path:
    """INT8 dynamic quantization of the MatMul / Gemm weights of an ONNX model (onnxruntime)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        op_types_to_quantize=["MatMul", "Gemm"],
    )
    return Path(dst)


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def compare_onnx(
    model: nn.Module,
    fp32_path: str | Path,
    int8_path: str | Path,
    example: Mapping[str, torch.Tensor],
    *,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, Any]:
    """Median latency (ms) of eager PyTorch, fp32 and INT8 onnxruntime on ``example``, the
    INT8 and fp32 outputs' cosine to eager, and the two files' sizes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    feeds = {k: v.numpy() for k, v in example.items()}
    out: dict[str, Any] = {}
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ref = main_output(model(**example)).float().numpy()
            out["eager_ms"] = _median_ms(lambda: model(**example), repeats, warmup)
    finally:
        model.train(was)
    for tag, p in (("fp32", fp32_path), ("int8", int8_path)):
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        y = sess.run(None, feeds)[0]
        a, b = ref.reshape(ref.shape[0], -1), y.reshape(y.shape[0], -1).astype(np.float32)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        out[f"{tag}_cosine_to_eager"] = float(cos.mean())
        out[f"{tag}_ms"] = _median_ms(lambda s=sess: s.run(None, feeds), repeats, warmup)
        out[f"{tag}_bytes"] = Path(p).stat().st_size
    return out
