"""Physical thinning: dead channels removed leave outputs unchanged; saved forms reload exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nncompress.engine import load_checkpoint, save_checkpoint
from nncompress.models import create
from nncompress.prune.graph import GraphError, build_dependency_graph
from nncompress.prune.thin import remove_channels_
from nncompress.stats import count_macs
from prune_nets import (
    InceptionNet,
    ResNet18ish,
    SeparableNet,
    TinyTransformerMLP,
    kill_channels_,
    randomize_bn_,
)

CASES = {
    "resnet-20": (lambda: create("resnet-20", width=8), (1, 12, 12)),
    "resnet18ish": (ResNet18ish, (3, 16, 16)),
    "inception": (InceptionNet, (3, 8, 8)),
    "separable": (SeparableNet, (3, 6, 6)),
    "transformer-mlp": (TinyTransformerMLP, (5, 8)),
}


def _kill_half(model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """Kill every other prunable channel of every group; return the thinning plan."""
    graph = build_dependency_graph(model, x)
    plan: dict[str, list[int]] = {}
    for group in graph.groups:
        chans = [c for c in range(group.size) if group.prunable[c]][::2]
        if not chans:
            continue
        kill_channels_(model, group, chans)
        producer = group.producers[0]
        plan[producer] = sorted(
            p for c in chans for m, p in group.producer_positions(c) if m == producer
        )
    return plan


@pytest.mark.parametrize("case", sorted(CASES))
def test_thinning_dead_channels_keeps_outputs(case):
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = build()
    randomize_bn_(model)
    model.eval()
    x = torch.randn(3, *shape)
    plan = _kill_half(model, x)
    assert plan, "every case has prunable channels"
    with torch.no_grad():
        before = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    report = remove_channels_(model, plan, x)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert report.params_after == sum(p.numel() for p in model.parameters()) < params_before
    assert report.macs_after < report.macs_before
    ref = count_macs(model, shape)
    assert report.macs_after == sum(v[0] for v in ref.values())
    # the thinned model is an ordinary trainable model
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_thinned_slices_are_the_kept_weights():
    model = ResNet18ish()
    randomize_bn_(model)
    x = torch.randn(1, 3, 16, 16)
    old_c1 = model.layer1[0].conv1.weight.detach().clone()
    old_c2 = model.layer1[0].conv2.weight.detach().clone()
    old_bn = model.layer1[0].bn1.running_var.clone()
    remove_channels_(model, {"layer1.0.conv1": [1, 4, 6]}, x)
    keep = [0, 2, 3, 5, 7]
    assert torch.equal(model.layer1[0].conv1.weight, old_c1[keep])
    assert torch.equal(model.layer1[0].conv2.weight, old_c2[:, keep])
    assert torch.equal(model.layer1[0].bn1.running_var, old_bn[keep])
    assert model.layer1[0].bn1.num_features == 5
    assert model.layer1[0].conv2.in_channels == 5 and model.layer1[0].conv2.out_channels == 8


def test_residual_group_expands_to_shortcut_and_identity_blocks():
    model = ResNet18ish()
    x = torch.randn(1, 3, 16, 16)
    remove_channels_(model, {"layer2.0.conv2": [0, 3]}, x)
    assert model.layer2[0].conv2.out_channels == 14
    assert model.layer2[0].down[0].out_channels == 14  # projection shortcut, same indices
    assert model.layer2[0].down[1].num_features == 14
    assert model.layer2[1].conv2.out_channels == 14  # identity block after it
    assert model.layer2[1].conv1.in_channels == 14
    assert model.fc.in_features == 14
    assert model(x).shape == (1, 5)


def test_conflicting_coupled_plan_is_refused_before_changes():
    model = ResNet18ish()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(GraphError, match="different channels"):
        remove_channels_(model, {"layer2.0.conv2": [1], "layer2.0.down.0": [2]}, x)
    assert model.layer2[0].conv2.out_channels == 16
    # the same indices on both producers are fine
    remove_channels_(model, {"layer2.0.conv2": [1], "layer2.0.down.0": [1]}, x)
    assert model.layer2[0].down[0].out_channels == 15


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"fc": [0]}, "model output"),
        ({"layer1.0.bn1": [0]}, "not a prunable Conv/Linear producer"),
        ({"layer1.0.conv1": [8]}, r"out of range \[0, 8\)"),
        ({"layer1.0.conv1": list(range(8))}, "would lose all its 8"),
    ],
)
def test_bad_plans_name_the_problem(plan, message):
    with pytest.raises(GraphError, match=message):
        remove_channels_(ResNet18ish(), plan, torch.randn(1, 3, 16, 16))


def test_zoo_model_saves_and_reloads_bit_exactly(tmp_path):
    model = create("resnet-20")
    randomize_bn_(model)
    x = torch.randn(2, 1, 28, 28)
    remove_channels_(
        model, {"layer1.1.conv1": [0, 5, 9], "layer3.0.conv2": list(range(0, 64, 3))}, x
    )
    path = save_checkpoint(model, tmp_path / "thin.safetensors", model_name="resnet-20")
    loaded, _ = load_checkpoint(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_custom_model_saves_and_reloads_bit_exactly(tmp_path):
    model = InceptionNet()
    randomize_bn_(model)
    x = torch.randn(2, 3, 8, 8)
    remove_channels_(model, {"b2.0": [1, 2], "mix": [6]}, x)
    path = save_checkpoint(model, tmp_path / "c.safetensors", reference=InceptionNet())
    loaded, _ = load_checkpoint(path, model=InceptionNet())
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert loaded.fc1.in_features == 6 * 16 and loaded.bn.num_features == 13


def test_layernorm_follows_and_channels_last_is_kept():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    ln_w = net[1].weight.detach().clone()
    remove_channels_(net, {"0": [2]}, torch.randn(3, 4))
    assert net[1].normalized_shape == (5,) and torch.equal(net[1].weight, ln_w[[0, 1, 3, 4, 5]])
    assert net(torch.randn(3, 4)).shape == (3, 2)

    conv = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 3, 3))
    conv = conv.to(memory_format=torch.channels_last)
    remove_channels_(conv, {"0": [0, 1]}, torch.randn(1, 2, 7, 7))
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert conv[2].weight.shape == (3, 4, 3, 3)


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_parametrized_layers_are_folded_then_thinned():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    mask = torch.ones(5, 4)
    mask[:, 0] = 0
    parametrize.register_parametrization(net[0], "weight", _Mask(mask))
    effective = net[0].weight.detach().clone()
    twin = copy.deepcopy(net)  # shares torch's injected Parametrized class with net[0]
    report = remove_channels_(net, {"0": [4]}, torch.randn(2, 4))
    assert report.folded_parametrizations == ["0"]
    assert not parametrize.is_parametrized(net[0])
    assert torch.equal(net[0].weight, effective[:4])
    assert parametrize.is_parametrized(twin[0]) and torch.equal(twin[0].weight, effective)
    assert twin(torch.randn(2, 4)).shape == (2, 3)
