"""Mobile CNNs through every transform (issue 20): tiny MobileNetV2 (ReLU6, depthwise, residual
adds), a tiny EfficientNet-style net (Conv2dSame subclass padding in forward, SiLU, squeeze-and-
excitation) and a net of Conv2d subclasses with static asymmetric padding in forward."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from onnx import TensorProto
from torch import nn

from nncompress.core.convs import ConvForm, conv_form
from nncompress.core.coverage import CoverageWarning
from nncompress.core.fx import trace
from nncompress.data import synthetic
from nncompress.models import Conv2dSame, EfficientNetLite, MobileNetV2
from nncompress.quant.fakequant import ActivationQuantizer
from nncompress.quant.linear import (
    PTQConfig,
    QATConfig,
    prepare,
    quantization_coverage,
    quantize_ptq,
    quantize_qat,
)
from nncompress.quant.onnx_export import export_onnx, make_session

SHAPE = (1, 16, 16)


class StaticSameConv(nn.Conv2d):
    """efficientnet_pytorch-style: TF "SAME" padding fixed at construction, applied by a
    ZeroPad2d child inside forward (asymmetric for stride 2 on an even size)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=True, image_size=16):
        super().__init__(cin, cout, k, stride, 0, groups=groups, bias=bias)
        out = math.ceil(image_size / stride)
        total = max((out - 1) * stride + k - image_size, 0)
        lo = total // 2
        self.static_padding = nn.ZeroPad2d((lo, total - lo, lo, total - lo))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )  # noqa: E501


class WSConv(nn.Conv2d):
    """Weight-standardised conv: not a padded convolution, must be refused / reported."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StaticNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StaticSameConv(1, 8, 3, 2, bias=False)  # 16 -> 8, pads (0, 1, 0, 1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.dw = StaticSameConv(8, 8, 3, 1, groups=8, bias=False, image_size=8)
        self.act2 = nn.Hardswish()
        self.pw = StaticSameConv(8, 12, 1, image_size=8)
        self.conv = StaticSameConv(12, 12, 3, 2, image_size=8)  # 8 -> 4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.pw(self.act2(self.dw(x)))
        x = F.relu(self.conv(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _nets():
    torch.manual_seed(0)
    return {
        "mobilenet": MobileNetV2(num_classes=4, width_mult=0.25).eval(),
        "efficientnet": EfficientNetLite(num_classes=4, width_mult=0.25).eval(),
        "static": StaticNet().eval(),
    }


def _with_bn_stats(model: nn.Module, data) -> nn.Module:
    """Give the BatchNorms realistic running statistics (a few train-mode passes)."""
    model.train()
    with torch.no_grad():
        for x, _ in data.loader("train", 64):
            model(x)
    return model.eval()


@pytest.fixture(scope="module")
def data():
    return synthetic(n=192, shape=SHAPE, num_classes=4)


@pytest.fixture(scope="module")
def nets(data):
    return {k: _with_bn_stats(m, data) for k, m in _nets().items()}


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


# ----------------------------------------------------------------- recognising the subclasses


def test_conv_subclasses_are_recognised_and_traced_as_convolutions(nets):
    eff, static = nets["efficientnet"], nets["static"]
    stem = conv_form(static.stem)
    assert stem == ConvForm((0, 1, 0, 1), (0, 0), False)
    down = next(m for m in eff.modules() if isinstance(m, Conv2dSame) and m.stride == (2, 2))
    form = conv_form(down, (down.in_channels, 16, 16))
    assert isinstance(form, ConvForm) and form.pad == (0, 1, 0, 1) and form.dynamic
    reason = conv_form(WSConv(2, 3, 3))
    assert isinstance(reason, str) and "mean" in reason
    for model in (eff, static):
        gm = trace(model)
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        assert set(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)) <= called
        assert not any(n.op == "call_function" and "conv" in str(n.target) for n in gm.graph.nodes)


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("name", ["mobilenet", "efficientnet", "static"])
def test_int8_ptq_quantizes_every_conv_and_runs_integer_in_onnxruntime(tmp_path, nets, data, name):
    model = nets[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)  # never silently partial
        gm = quantize_ptq(model, data.loader("val", 32), PTQConfig("int8", "uint8"))
    cov = quantization_coverage(gm)
    assert sorted(x.name for x in cov.changed) == sorted(_layers(model)) and not cov.skipped
    path = export_onnx(gm, tmp_path / "m.onnx", SHAPE)
    m = onnx.load(str(path))
    assert not any(
        t.data_type == TensorProto.FLOAT and len(t.dims) > 1 for t in m.graph.initializer
    )
    n_int8 = sum(t.data_type == TensorProto.INT8 and len(t.dims) > 1 for t in m.graph.initializer)
    assert n_int8 == len(_layers(model))
    x = data.test[0][:64]
    out = make_session(path).run(None, {"input": x.numpy()})[0]
    sim = gm(x).detach().numpy()
    step = float([q for q in gm.modules() if isinstance(q, ActivationQuantizer)][-1].scale)
    assert np.abs(out - sim).mean() <= 2 * step
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.9
    # onnxruntime runs every convolution (depthwise included) as an integer kernel
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == len(_layers(model)) - 1


def test_activations_fused_or_quantized_once(nets):
    def kinds(gm, node):
        mods = dict(gm.named_modules())
        return mods.get(str(node.target)) if node.op == "call_module" else None

    for name, fused, floating in (
        ("mobilenet", (nn.ReLU6,), ()),
        ("efficientnet", (), (nn.SiLU, nn.Sigmoid)),
        ("static", (nn.ReLU6,), (nn.Hardswish,)),
    ):
        gm = prepare(nets[name], PTQConfig("int8", "uint8"))
        for node in gm.graph.nodes:
            mod = kinds(gm, node)
            users = [kinds(gm, u) for u in node.users]
            if isinstance(mod, fused):  # conv -> ReLU6 -> one quantizer
                assert not isinstance(kinds(gm, node.args[0]), ActivationQuantizer), node
                assert len(users) == 1 and isinstance(users[0], ActivationQuantizer), node
            if isinstance(mod, floating):  # quantized input, quantized output
                assert isinstance(kinds(gm, node.args[0]), ActivationQuantizer), node
                assert all(isinstance(u, ActivationQuantizer) for u in users), node
        # no tensor is quantized twice in a row
        for node in gm.graph.nodes:
            if isinstance(kinds(gm, node), ActivationQuantizer):
                assert not isinstance(kinds(gm, node.args[0]), ActivationQuantizer), node


@pytest.mark.parametrize("name", ["mobilenet", "efficientnet"])
def test_int4_qat_exports_int4_weights(tmp_path, nets, data, name):
    from nncompress.engine import TrainConfig

    gm = quantize_qat(
        nets[name],
        data.loader("train", 64),
        QATConfig("int4", "uint8"),
        TrainConfig(epochs=1, lr=0.01, batch_size=64),
        calibration_loader=data.loader("val", 64),
    )
    cov = quantization_coverage(gm)
    assert len(cov.changed) == len(_layers(nets[name])) and not cov.skipped
    path = export_onnx(gm, tmp_path / "w4.onnx", SHAPE)
    m = onnx.load(str(path))
    assert sum(t.data_type == TensorProto.INT4 for t in m.graph.initializer) >= len(_layers(gm))
    x = data.test[0][:64]
    out = make_session(path).run(None, {"input": x.numpy()})[0]
    assert (out.argmax(1) == gm(x).argmax(1).numpy()).mean() >= 0.85


def test_unrecognised_subclass_is_reported_not_silently_float(tmp_path, data):
    from nncompress.lowrank import DecomposeConfig, decompose_
    from nncompress.prune import FilterPruneConfig, GraphError, prune_filters_

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), WSConv(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).eval()  # fmt: skip
    with pytest.warns(CoverageWarning, match="'2'.*WSConv"):
        gm = quantize_ptq(model, data.loader("val", 32), PTQConfig("int8", "uint8"))
    cov = quantization_coverage(gm)
    assert [x.name for x in cov.skipped] == ["2"] and "F.pad" in cov.skipped[0].detail
    with pytest.raises(GraphError, match="WSConv.*rewrite its forward"):
        prune_filters_(copy.deepcopy(model), FilterPruneConfig(ratio=0.5), torch.zeros(1, *SHAPE))
    rep = decompose_(copy.deepcopy(model), DecomposeConfig(method="tucker2", rank=2))
    entry = next(x for x in rep.layers if x.name == "2")
    assert entry.status == "skipped" and "WSConv" in entry.reason


# ------------------------------------------------------------------- pruning, sharing, .ncz


def test_magnitude_pruning_sharing_and_ncz_round_trip(tmp_path, nets):
    from nncompress.io import EncodeConfig, load_compressed, save_compressed
    from nncompress.prune import MagnitudeConfig, prune_
    from nncompress.quant import KMeansConfig, share_weights_

    for name in ("efficientnet", "mobilenet"):
        model = copy.deepcopy(nets[name])
        rep = prune_(model, MagnitudeConfig(sparsity=0.6))
        assert sorted(x.name for x in rep.coverage.changed) == sorted(_layers(model))
        share = share_weights_(model, KMeansConfig(bits_conv=4, bits_fc=4))
        assert len(share.coverage.changed) == len(_layers(model))
        save_compressed(model, tmp_path / f"{name}.ncz", EncodeConfig(codec="huffman"))
        fresh = copy.deepcopy(nets[name])
        load_compressed(fresh, tmp_path / f"{name}.ncz")
        x = torch.randn(4, *SHAPE)
        assert torch.equal(fresh(x), model(x))


def test_filter_pruning_couples_depthwise_residual_and_se(tmp_path, nets):
    from nncompress.engine import load_checkpoint, save_checkpoint
    from nncompress.prune import FilterPruneConfig, build_dependency_graph, prune_filters_
    from nncompress.stats import count_macs

    x = torch.zeros(1, *SHAPE)
    eff = copy.deepcopy(nets["efficientnet"])
    graph = build_dependency_graph(eff, x)
    # SE: the gate's expand conv multiplies the depthwise output channel by channel
    block = next(
        n for n, m in eff.named_modules() if n.endswith(".se") and eff.get_submodule(n[:-3]).expand
    )[:-3]
    se_block = f"{block}.se"
    assert f"{block}.expand.0" in graph.group_of(f"{se_block}.expand").producers
    mob = copy.deepcopy(nets["mobilenet"])
    mgraph = build_dependency_graph(mob, x)
    # residual adds: blocks 1 and 2 (24 channels, stride 1 in block 2) share their projections
    assert "blocks.1.project.0" in mgraph.group_of("blocks.2.project.0").producers
    for model, kwargs in ((eff, {"width_mult": 0.25}), (mob, {"width_mult": 0.25})):
        before = sum(d for d, _ in count_macs(model, SHAPE).values())
        rep = prune_filters_(model, FilterPruneConfig(ratio=0.3), x)
        assert rep.macs_after < before and rep.coverage.changed
        assert model(torch.randn(2, *SHAPE)).shape == (2, 4)
        name = "efficientnet-lite" if model is eff else "mobilenet-v2"
        path = save_checkpoint(
            model, tmp_path / f"{name}.safetensors", model_name=name,
            model_kwargs={"num_classes": 4, **kwargs},
        )  # fmt: skip
        back, _ = load_checkpoint(path)
        y = torch.randn(2, *SHAPE)
        assert torch.equal(back.eval()(y), model.eval()(y))
    assert all(type(m) is Conv2dSame for m in eff.modules() if isinstance(m, nn.Conv2d))


def test_removing_dead_channels_of_padded_subclasses_is_exact(nets):
    from nncompress.prune import remove_channels_

    model = copy.deepcopy(nets["static"])
    with torch.no_grad():  # channels 1 and 5 of the stem produce zeros after BatchNorm
        model.bn.weight[[1, 5]] = 0.0
        model.bn.bias[[1, 5]] = 0.0
    x = torch.randn(3, *SHAPE)
    ref = model(x)
    remove_channels_(model, {"stem": [1, 5]}, torch.zeros(1, *SHAPE))
    assert type(model.stem) is StaticSameConv and model.stem.out_channels == 6
    assert model.dw.groups == 6 and model.pw.in_channels == 6
    assert torch.allclose(model(x), ref, atol=1e-5)


# ---------------------------------------------------------------------------- low rank


def test_svd_of_pointwise_convs_and_depthwise_not_decomposable(nets):
    from nncompress.lowrank import DecomposeConfig, decompose_, svd_conv1x1

    eff = copy.deepcopy(nets["efficientnet"])
    pw = next(m for m in eff.modules() if isinstance(m, Conv2dSame) and m.kernel_size == (1, 1))
    x = torch.randn(2, pw.in_channels, 8, 8)
    full = svd_conv1x1(pw, min(pw.out_channels, pw.in_channels))
    assert torch.allclose(full(x), pw(x), atol=1e-5)
    rep = decompose_(eff, DecomposeConfig(method="svd", rank_fraction=0.5), input_shape=SHAPE)
    by_name = {x.name: x for x in rep.layers}
    dws = [
        n
        for n, m in nets["efficientnet"].named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    ]  # noqa: E501
    assert dws and all("depthwise convolution: not decomposable" in by_name[n].reason for n in dws)
    assert any(x.status == "decomposed" and x.type.startswith("Conv2dSame") for x in rep.layers)
    assert eff(torch.randn(2, *SHAPE)).shape == (2, 4)
    assert rep.coverage.changed and rep.to_dict()["coverage"]["skipped"]


def test_tucker2_and_cp_keep_the_subclass_padding(nets):
    from nncompress.lowrank import DecomposeConfig, decompose_, tucker2_conv

    static = copy.deepcopy(nets["static"])
    conv = static.conv  # 3x3 stride 2, padding (0, 1, 0, 1) inside forward
    x = torch.randn(2, 12, 8, 8)
    full = tucker2_conv(conv, (12, 12))
    assert torch.allclose(full(x), conv(x), atol=1e-4)
    eff = copy.deepcopy(nets["efficientnet"])
    for m in eff.modules():
        if isinstance(m, Conv2dSame) and m.groups == 1 and m.kernel_size == (3, 3):
            full = tucker2_conv(m, (m.out_channels, m.in_channels))
            for size in (16, 17):  # the padding follows the input size, as in the original
                z = torch.randn(1, m.in_channels, size, size)
                assert torch.allclose(full(z), m(z), atol=1e-4)
    for method in ("tucker2", "cp"):
        model = copy.deepcopy(static)
        rep = decompose_(model, DecomposeConfig(method=method, rank=4), input_shape=SHAPE)
        entry = next(e for e in rep.layers if e.name == "conv")
        assert entry.status == "decomposed" and entry.rel_error < 1.0
        if method == "cp":
            assert isinstance(model.conv[0], nn.ZeroPad2d) and model.conv[0].padding == (0, 1, 0, 1)
        assert model(torch.randn(2, *SHAPE)).shape == (2, 4)


# -------------------------------------------------------- distillation, PQ, early exits


def test_distillation_pq_and_early_exits(nets, data):
    from nncompress.conditional import ExitConfig, attach_exits_
    from nncompress.distill import distillation_loss
    from nncompress.engine import TrainConfig, fit
    from nncompress.quant import PQConfig, pq_quantize_

    teacher = nets["efficientnet"]
    student = MobileNetV2(num_classes=4, width_mult=0.25)
    hist = fit(
        student,
        data.loader("train", 64),
        TrainConfig(epochs=1, lr=0.05, batch_size=64),
        loss_fn=distillation_loss(teacher),
    )
    assert math.isfinite(hist.last["train_loss"])
    mob = copy.deepcopy(nets["mobilenet"])
    cfg = PQConfig(k=16, layer_steps=2, global_steps=0, bn_batches=1, calibration_batches=2)
    rep = pq_quantize_(mob, cfg, data.loader("val", 32))
    assert len(rep.layers) == len(_layers(mob)) and len(rep.coverage.changed) == len(rep.layers)
    assert mob(torch.randn(2, *SHAPE)).shape == (2, 4)
    net = attach_exits_(
        copy.deepcopy(nets["mobilenet"]), ExitConfig(after=("blocks.2",)), input_shape=SHAPE
    )  # noqa: E501
    outs = net.forward_all(torch.randn(2, *SHAPE))
    assert len(outs) == 2 and all(o.shape == (2, 4) for o in outs)


def test_low_coverage_warns(nets):
    from nncompress.lowrank import DecomposeConfig, decompose_

    with pytest.warns(CoverageWarning, match="changed only"):
        decompose_(
            copy.deepcopy(nets["mobilenet"]),
            DecomposeConfig(method="svd", rank=1),
            filter=["fc"],
            input_shape=SHAPE,
        )
