"""ONNX export of quantized models, run by onnxruntime, against the PyTorch simulation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from nncompress.data import synthetic
from nncompress.models import CifarResNet
from nncompress.quant.linear import ActivationQuantizer, PTQConfig, quantize_ptq
from nncompress.quant.onnx_export import (
    ExportError,
    evaluate_onnx,
    export_onnx,
    make_session,
    onnx_metadata,
    onnx_stats,
)
from nncompress.stats import count_macs

SHAPE = (1, 8, 8)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))  # (B, 6, 4, 4)
        x = self.relu(self.conv2(x))  # (B, 8, 2, 2)
        return self.fc(torch.flatten(x, 1))  # (B, 4)


@pytest.fixture(scope="module")
def data():
    return synthetic(n=256, shape=SHAPE, num_classes=4)


def _session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _output_step(gm) -> float:
    last = [m for m in gm.modules() if isinstance(m, ActivationQuantizer)][-1]
    return float(last.scale)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_onnx_matches_fake_quantized_model_within_one_step(tmp_path, data, weights, activations):
    torch.manual_seed(0)
    model = TinyNet().eval()
    # 7-bit weights: exact integer kernels on CPUs without VNNI (see PTQConfig.reduce_range)
    cfg = PTQConfig(weights, activations, reduce_range=True)
    gm = quantize_ptq(model, data.loader("val", 32), cfg)
    path = export_onnx(gm, tmp_path / "m.onnx", SHAPE)
    x = data.test[0][:64]
    sim = gm(x).detach().numpy()
    step = _output_step(gm)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,  # reference QDQ ops in float
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # fused integer kernels
    ):
        out = _session(path, level).run(None, {"input": x.numpy()})[0]
        assert np.abs(out - sim).max() <= step * 1.001, (level, np.abs(out - sim).max(), step)


def test_weights_are_stored_as_integers(tmp_path, data):
    torch.manual_seed(0)
    model = TinyNet().eval()
    n_w = sum(m.weight.numel() for m in (model.conv1, model.conv2, model.fc))
    for weights, dtype, nbytes in (
        ("int8", TensorProto.INT8, n_w),
        ("int4", TensorProto.INT4, (6 * 9 + 1) // 2 + (8 * 54) // 2 + (4 * 32) // 2),
    ):
        gm = quantize_ptq(model, data.loader("val", 32), PTQConfig(weights))
        m = onnx.load(str(export_onnx(gm, tmp_path / f"{weights}.onnx", SHAPE)))
        w = [t for t in m.graph.initializer if t.name.endswith("weight_q")]
        assert len(w) == 3 and all(t.data_type == dtype for t in w)
        assert sum(len(t.raw_data) for t in w) == nbytes
        assert not any(
            t.data_type == TensorProto.FLOAT and len(t.dims) > 1 for t in m.graph.initializer
        )


def test_ort_integer_kernels_are_used(tmp_path, data):
    torch.manual_seed(0)
    gm = quantize_ptq(TinyNet().eval(), data.loader("val", 32), PTQConfig("int8", "uint8"))
    path = export_onnx(gm, tmp_path / "m.onnx", SHAPE)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in ops and ("QGemm" in ops or "QLinearMatMul" in ops)
    assert "Conv" not in ops and "Gemm" not in ops


def test_pruned_zeros_are_zero_in_the_onnx_file(tmp_path, data):
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.conv2.weight[torch.rand_like(model.conv2.weight) < 0.6] = 0.0
    gm = quantize_ptq(model, data.loader("val", 32), PTQConfig("int8", fold_bn=False))
    m = onnx.load(str(export_onnx(gm, tmp_path / "m.onnx", SHAPE)))
    q = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "conv2_weight_q"))
    zeros = (model.conv2.weight == 0).numpy()
    assert zeros.any() and (q[zeros] == 0).all()


def test_fp32_export_matches_torch_and_residual_net_runs(tmp_path, data):
    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=4, width=4).eval()
    path = export_onnx(model, tmp_path / "fp32.onnx", SHAPE, metadata={"dataset": {"name": "x"}})
    x = data.test[0][:16]
    out = make_session(path).run(None, {"input": x.numpy()})[0]
    assert np.allclose(out, model(x).detach().numpy(), atol=1e-4)
    gm = quantize_ptq(model, data.loader("train", 64), PTQConfig("int8", "uint8"))
    qpath = export_onnx(gm, tmp_path / "int8.onnx", SHAPE)
    out = make_session(qpath).run(None, {"input": x.numpy()})[0]
    sim = gm(x).detach().numpy()
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.9
    assert onnx_metadata(path)["dataset"] == {"name": "x"}
    assert onnx_metadata(path)["input_shape"] == list(SHAPE)


def test_onnx_stats_and_evaluate(tmp_path, data):
    torch.manual_seed(0)
    model = TinyNet().eval()
    gm = quantize_ptq(model, data.loader("val", 32), PTQConfig("int8"))
    path = export_onnx(gm, tmp_path / "m.onnx", SHAPE)
    st = onnx_stats(path, batches=(1, 4), repeats=3)
    assert st["macs"] == sum(d for d, _ in count_macs(model, SHAPE).values())
    assert st["bytes_by_dtype"]["int8"] >= sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert set(st["latency_ms"]) == {"batch_1", "batch_4"}
    assert st["file_bytes"] == path.stat().st_size
    res = evaluate_onnx(path, data.loader("test", 32))
    sim = gm(data.test[0]).argmax(1)
    ref = 100.0 * float((sim == data.test[1]).float().mean())
    assert res["samples"] == len(data.test[1])
    assert abs(res["accuracy"] - ref) <= 100.0 * 3 / len(data.test[1])


class _Bessel(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)


def test_operators_beyond_the_old_whitelist_export(tmp_path):
    # the hand-written exporter refused all of these; torch.onnx.export writes them
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(1, 4, 3, stride=2),
        nn.ReLU6(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.SiLU(),
        nn.Hardswish(),
        nn.Conv2d(4, 4, 1),
        nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.GELU(),
    ).eval()
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE)
    x = torch.randn(5, *SHAPE)
    out = make_session(path).run(None, {"input": x.numpy()})[0]
    assert np.allclose(out, model(x).detach().numpy(), atol=1e-5)


def test_unsupported_operator_is_named(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), _Bessel())
    with pytest.raises(ExportError, match="aten::i0"):
        export_onnx(model, tmp_path / "m.onnx", SHAPE)
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "m.bin", SHAPE)


def test_int4_only_models_fold_weights_to_float_at_session_start(tmp_path, data):
    from nncompress.quant.onnx_export import _int4_only

    torch.manual_seed(0)
    model = TinyNet().eval()
    p4 = export_onnx(
        quantize_ptq(model, data.loader("val", 32), PTQConfig("int4")), tmp_path / "w4.onnx", SHAPE
    )
    p8 = export_onnx(
        quantize_ptq(model, data.loader("val", 32), PTQConfig("int8")), tmp_path / "w8.onnx", SHAPE
    )
    mixed = PTQConfig("int4", keep_first_last="int8")
    pm = export_onnx(quantize_ptq(model, data.loader("val", 32), mixed), tmp_path / "m.onnx", SHAPE)
    assert _int4_only(p4) and not _int4_only(p8) and not _int4_only(pm)
    x = data.test[0][:32].numpy()
    ref = _session(p4, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"input": x})[0]
    assert np.allclose(make_session(p4).run(None, {"input": x})[0], ref, atol=1e-5)
