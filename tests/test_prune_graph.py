"""Channel dependency graph: couplings found by tracing (Li et al. 2017 filter pruning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.models import create
from nncompress.prune.graph import GraphError, build_dependency_graph
from nncompress.stats import count_macs
from prune_nets import InceptionNet, ResNet18ish, SeparableNet, TinyTransformerMLP


def _producer_sets(graph) -> list[set[str]]:
    return [set(g.producers) for g in graph.groups]


def test_resnet20_residual_groups():
    g = build_dependency_graph(create("resnet-20"), torch.randn(2, 1, 28, 28))
    sets = _producer_sets(g)
    # identity shortcuts chain the stem and every stage-1 block's last conv into one group
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} in sets
    # the projection shortcut is coupled with the block's last conv and the identity blocks after
    assert {"layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"} in sets
    # convs inside a block are free
    assert {"layer1.0.conv1"} in sets and {"layer3.2.conv1"} in sets
    fc = g.group_of("fc")
    assert fc.num_prunable == 0 and "model output" in fc.describe()["fixed_because"]
    grp = g.group_of("layer2.1.conv2")
    members = set(grp.members)
    for name in ("layer2.0.bn2", "layer2.0.shortcut.1", "layer2.1.bn2", "layer2.2.bn2"):
        assert (name, "follow") in members
    for name in ("layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1", "layer3.0.shortcut.0"):
        assert (name, "in") in members


def test_macs_match_stats_counter():
    model = create("resnet-20")
    g = build_dependency_graph(model, torch.randn(1, 1, 28, 28))
    ref = count_macs(model, (1, 28, 28))
    assert g.macs() == {k: v[0] for k, v in ref.items()}


def test_concat_offsets_map_to_producers():
    g = build_dependency_graph(InceptionNet(), torch.randn(2, 3, 8, 8))
    for name, offset, size in (("b1", 0, 4), ("b2.0", 4, 6), ("b3.1", 10, 5)):
        grp = g.group_of(name)
        assert grp.producers == [name] and grp.size == size
        for c in range(size):
            assert grp.channels[c][("bn", "follow")] == [offset + c]
            assert grp.channels[c][("mix", "in")] == [offset + c]
    # flatten -> Linear: channel c of 'mix' is features c*16 .. c*16+15 of fc1
    grp = g.group_of("mix")
    assert grp.channels[3][("fc1", "in")] == list(range(48, 64))


def test_depthwise_propagates_and_grouped_is_fixed():
    g = build_dependency_graph(SeparableNet(), torch.randn(1, 3, 6, 6))
    grp = g.group_of("conv")
    assert grp.size == 8 and grp.num_prunable == 8
    assert {("dw", "follow"), ("dwbn", "follow"), ("pw", "in"), ("bn", "follow")} <= set(
        grp.members
    )

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    g = build_dependency_graph(Grouped(), torch.randn(1, 3, 4, 4))
    assert g.group_of("a").num_prunable == 0
    assert "grouped conv 'b'" in g.group_of("a").reasons[0]
    assert g.group_of("b").num_prunable == 0


def test_transformer_mlp_hidden_units_free_residual_stream_fixed():
    g = build_dependency_graph(TinyTransformerMLP(), torch.randn(2, 5, 8))
    hidden = g.group_of("blocks.0.fc1")
    assert hidden.producers == ["blocks.0.fc1"] and hidden.num_prunable == 16
    assert ("blocks.0.fc2", "in") in hidden.members
    stream = g.group_of("blocks.0.fc2")
    assert {"blocks.0.fc2", "blocks.1.fc2"} == set(stream.producers)
    assert stream.num_prunable == 0  # added to the model input, whose channels are fixed


def test_hardcoded_view_is_fixed_not_wrong():
    class HardView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 64))

    g = build_dependency_graph(HardView(), torch.randn(2, 1, 4, 4))
    grp = g.group_of("conv")
    assert grp.num_prunable == 0 and "only flattening" in grp.reasons[0]
    with pytest.raises(GraphError, match="channel 0 cannot be removed"):
        g.expand({"conv": [0]})


def test_unsupported_op_names_op_and_module():
    class Weird(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.odd = Weird()

        def forward(self, x):
            return self.odd(self.conv(x))

    with pytest.raises(GraphError, match=r"cumsum.*module 'odd'"):
        build_dependency_graph(Net(), torch.randn(1, 1, 5, 5))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(GraphError, match=r"MultiheadAttention at 'mha'"):
        build_dependency_graph(Attn(), torch.randn(1, 3, 8))


def test_untraceable_control_flow_names_module():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.gate = Branchy()

        def forward(self, x):
            return self.gate(self.conv(x))

    with pytest.raises(GraphError, match=r"cannot trace.*module 'gate'"):
        build_dependency_graph(Net(), torch.randn(1, 1, 3, 3))


def test_building_keeps_training_flag_and_bn_stats():
    model = ResNet18ish().train()
    before = model.stem[1].running_mean.clone()
    build_dependency_graph(model, torch.randn(2, 3, 16, 16))
    assert model.training
    assert torch.equal(model.stem[1].running_mean, before)
