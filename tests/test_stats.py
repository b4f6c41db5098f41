"""Model statistics: parameters, nonzeros, MACs (checked against hand counts), latency, tables."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nncompress.models import create
from nncompress.stats import count_macs, format_table, measure_latency, model_stats

# LeNet-5 on 1x28x28, counted by hand:
#   conv1: 24x24 output positions x 20 filters x (1*5*5) weights each
#   conv2: 8x8 positions x 50 filters x (20*5*5)
#   fc1: 800 inputs x 500 outputs; fc2: 500 x 10
LENET5_HAND = {
    "conv1": 24 * 24 * 20 * 25,
    "conv2": 8 * 8 * 50 * 20 * 25,
    "fc1": 800 * 500,
    "fc2": 500 * 10,
}


def test_lenet5_macs_match_hand_count():
    macs = count_macs(create("lenet-5"), (1, 28, 28))
    assert {k: v[0] for k, v in macs.items()} == LENET5_HAND
    assert sum(LENET5_HAND.values()) == 2_293_000


def test_lenet_300_100_macs():
    macs = count_macs(create("lenet-300-100"), (1, 28, 28))
    assert sum(v[0] for v in macs.values()) == 784 * 300 + 300 * 100 + 100 * 10


def test_grouped_and_strided_conv_macs():
    # depthwise 3x3 stride 2 on 8 channels 16x16 -> 8x8 output; each output uses 9 weights
    net = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.Conv2d(8, 4, 1))
    macs = count_macs(net, (8, 16, 16))
    assert macs["0"][0] == 8 * 8 * 8 * 9
    assert macs["1"][0] == 8 * 8 * 4 * 8


def test_nonzero_macs_after_zeroing_weights():
    torch.manual_seed(0)
    model = create("lenet-5")
    with torch.no_grad():
        model.conv2.weight[:25] = 0  # half of conv2's filters
        model.fc1.weight[model.fc1.weight.abs() < 0.02] = 0
    nnz_fc1 = int(torch.count_nonzero(model.fc1.weight))
    stats = model_stats(model, (1, 28, 28))
    by = {layer.name: layer for layer in stats.layers}
    assert by["conv2"].macs == LENET5_HAND["conv2"]
    assert by["conv2"].macs_nonzero == LENET5_HAND["conv2"] // 2
    assert by["fc1"].macs_nonzero == nnz_fc1
    assert by["conv1"].macs_nonzero == by["conv1"].macs
    assert stats.macs == sum(LENET5_HAND.values())
    assert stats.macs_nonzero == sum(layer.macs_nonzero for layer in stats.layers)
    # nonzeros include the (untouched) biases
    assert by["conv2"].nonzeros == 25 * 20 * 25 + 50
    assert by["conv2"].sparsity == pytest.approx(1 - (25 * 500 + 50) / (50 * 500 + 50))
    assert stats.params == 431_080 and stats.bytes_fp32 == 4 * 431_080


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_parametrized_bias_free_conv_is_counted_as_effective_weight():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    mask = (torch.rand_like(net[0].weight) > 0.5).float()
    parametrize.register_parametrization(net[0], "weight", _Mask(mask))
    stats = model_stats(net, (1, 8, 8))
    by = {layer.name: layer for layer in stats.layers}
    assert set(by) == {"0", "2"}
    assert by["0"].type == "Conv2d"
    assert by["0"].params == 36 and by["0"].nonzeros == int(mask.sum())
    assert by["0"].macs == 36 * 36 and by["0"].macs_nonzero == 36 * int(mask.sum())
    assert stats.params == 36 + 435


def test_batchnorm_layers_counted_and_dict_keys():
    model = create("resnet-20")
    stats = model_stats(model, (1, 28, 28))
    assert stats.params == sum(p.numel() for p in model.parameters())
    d = stats.to_dict()
    for key in ("params", "nonzeros", "macs", "macs_nonzero", "bytes_fp32", "layers", "latency_ms"):
        assert key in d
    assert any(layer["type"] == "BatchNorm2d" for layer in d["layers"])


def test_latency_median_and_training_flag_restored():
    model = create("lenet-300-100", in_features=64).train()
    ms = measure_latency(model, (1, 8, 8), batch_size=4, repeats=5, warmup=1)
    assert ms > 0 and model.training
    stats = model_stats(model, (1, 8, 8), latency_batches=(1, 8), repeats=3)
    assert set(stats.latency_ms) == {"batch_1", "batch_8"}
    assert all(v > 0 for v in stats.latency_ms.values())
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(model, (1, 8, 8), repeats=0)


def test_count_macs_restores_training_flag():
    model = create("lenet-5").train()
    count_macs(model, (1, 28, 28))
    assert model.training


def test_format_table_markdown():
    text = format_table(["layer", "params"], [["fc1", 235200], ["fc2", 0.5]])
    lines = text.splitlines()
    assert lines[0].startswith("| layer") and set(lines[1]) <= {"|", "-"}
    assert "235,200" in lines[2] and "0.5" in lines[3]
    assert len({len(line) for line in lines}) == 1
