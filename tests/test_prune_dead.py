"""Dead-neuron detection and physical removal after connection pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.engine import load_checkpoint, save_checkpoint
from nncompress.models import create
from nncompress.prune import MagnitudeConfig, prune_, pruning_masks
from nncompress.prune.dead import find_dead_neurons, neuron_edges, remove_dead_neurons_


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(20, 10),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(10, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    )


def test_edges_of_mlp_and_lenet5():
    edges = neuron_edges(_mlp())
    assert {p: e.consumer for p, e in edges.items()} == {"1": "4", "4": "6"}
    assert edges["1"].act == "relu"
    e5 = neuron_edges(create("lenet-5"))
    assert {p: e.consumer for p, e in e5.items()} == {
        "conv1": "conv2",
        "conv2": "fc1",
        "fc1": "fc2",
    }
    assert e5["conv2"].flatten and not e5["conv1"].flatten


def test_detect_and_remove_mlp_with_bias_folding():
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.3))
    with torch.no_grad():
        # neuron 2 of layer 1: no outputs; neuron 5: no inputs, bias > 0 (constant relu(b))
        model[4].parametrizations.weight.original[:, 2] = 0
        model[4].parametrizations.weight.original[:, 2] = 0
        model[1].parametrizations.weight.original[5] = 0
        model[1].bias[5] = 0.7
        # neuron 3 of layer 4: no inputs, negative bias -> relu gives 0
        model[4].parametrizations.weight.original[3] = 0
        model[4].bias[3] = -0.4
    # masks follow the manual zeros
    from nncompress.prune import masks_from_zeros_

    masks_from_zeros_(model)
    dead = find_dead_neurons(model)
    assert 2 in dead["1"]["no_output"]
    assert 5 in dead["1"]["no_input"]
    assert 3 in dead["4"]["no_input"]
    x = torch.randn(16, 20)
    model.eval()
    y = model(x)
    rep = remove_dead_neurons_(model, x)
    assert model[1].out_features <= 8 and model[4].in_features == model[1].out_features
    assert model[4].out_features <= 7 and model[6].in_features == model[4].out_features
    assert rep["params_after"] < rep["params_before"]
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    assert set(pruning_masks(model)) == {"1", "4", "6"}  # masks re-created on the new layers
    assert find_dead_neurons(model) == {}


def test_remove_dead_conv_chain_lenet5_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create("lenet-5", in_channels=1, image_size=28)
    prune_(model, MagnitudeConfig(sparsity=0.5))
    with torch.no_grad():
        model.conv1.parametrizations.weight.original[[1, 4]] = 0  # no input; bias stays
        model.conv2.parametrizations.weight.original[:, 7] = 0  # conv1 ch 7: no output
        model.conv2.parametrizations.weight.original[[0, 9]] = 0  # conv2 ch 0, 9: no input
        model.fc1.parametrizations.weight.original[:, 16 * 3 : 16 * 4] = 0  # conv2 ch 3
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    y = model(x)
    rep = remove_dead_neurons_(model, x)
    # conv1 ch 1, 4: constant relu(b) would pass a padding-free conv2: folded into its bias
    assert model.conv1.out_channels == 20 - 3
    assert model.conv2.in_channels == 17
    assert model.conv2.out_channels == 50 - 3
    assert model.fc1.in_features == 47 * 16
    assert rep["layers"]["conv1"]["after"] == 17
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-4)
    path = save_checkpoint(
        model,
        tmp_path / "d.safetensors",
        model_name="lenet-5",
        model_kwargs={"in_channels": 1, "image_size": 28},
    )
    loaded, side = load_checkpoint(path)
    assert "conv1" in side["architecture"]["replacements"]
    torch.testing.assert_close(loaded(x), y, atol=1e-5, rtol=1e-4)


def test_residual_producer_is_left_alone():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            return self.c(torch.relu(self.b(h) + h))

    m = Res()
    with torch.no_grad():
        m.a.weight[0] = 0
    assert "a" not in neuron_edges(m)
    x = torch.randn(3, 6)
    y = m(x)
    remove_dead_neurons_(m, x)
    assert m.a.out_features == 6
    torch.testing.assert_close(m(x), y)


def test_batchnorm_channel_with_no_outputs_removed():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)
    )
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[3].weight[:, 1] = 0
        m[0].weight[2] = 0  # no input, but BN makes it a nonzero constant, padded conv: kept
        m[1].bias[2] = 5.0
    m.eval()
    x = torch.randn(2, 1, 5, 5)
    y = m(x)
    rep = remove_dead_neurons_(m, x)
    assert m[0].out_channels == 3 and m[1].num_features == 3 and m[3].in_channels == 3
    assert rep["layers"]["0"]["skipped"] == [1]  # index after removing channel 1 -> old ch. 2
    torch.testing.assert_close(m(x), y)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_pruned_mlp_outputs_identical(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    prune_(model, MagnitudeConfig(sparsity=0.9, scope="global"))
    x = torch.randn(32, 12)
    y = model(x)
    rep = remove_dead_neurons_(model, x)
    assert rep["params_after"] <= rep["params_before"]
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-4)
