"""Early-exit networks: exact equivalences, per-sample exiting, costs, stats, save/load, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from torch import nn

from nncompress.conditional import (
    EarlyExitNet,
    ExitConfig,
    attach_exits_,
    confidence,
    evaluate_exits,
    exit_costs,
)
from nncompress.engine import ConfigError, load_checkpoint, save_checkpoint
from nncompress.models import create
from nncompress.stats import count_macs, measure_latency_over, model_stats


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),  # 0: (8, 8, 8)
        nn.BatchNorm2d(8),
        nn.ReLU(),  # 2: exit 0
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 3: (16, 4, 4)
        nn.ReLU(),  # 4: exit 1
        nn.Conv2d(16, 16, 3, padding=1),  # 5
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),  # 9
    )


SHAPE = (1, 8, 8)


def _net(head: str = "pool-linear", thresholds=None) -> EarlyExitNet:
    model = small_cnn().eval()
    net = attach_exits_(
        model, ExitConfig(after=["2", "4"], head=head, thresholds=thresholds), input_shape=SHAPE
    )
    torch.manual_seed(1)
    with torch.no_grad():  # make the heads and BN statistics non-trivial
        for p in net.heads.parameters():
            p.normal_(0, 0.5)
        model[1].running_mean.normal_(0, 0.1)
        model[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_heads_do_not_change_the_backbone_output():
    net = _net()
    x = torch.randn(16, *SHAPE)
    reference = small_cnn().eval()
    reference.load_state_dict(net.backbone.state_dict())
    with torch.no_grad():
        outs = net.forward_all(x)
        assert len(outs) == 3 and all(o.shape == (16, 10) for o in outs)
        assert torch.equal(outs[-1], reference(x))
        net.train()
        outs_train = net(x)  # training mode returns every exit
        assert isinstance(outs_train, list) and len(outs_train) == 3
    # the backbone's own parameters are the same objects, unchanged in number
    assert sum(p.numel() for p in net.backbone.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


def test_all_thresholds_one_is_exactly_the_original():
    net = _net(thresholds=[1.0, 1.0])
    x = torch.randn(32, *SHAPE)
    reference = small_cnn().eval()
    reference.load_state_dict(net.backbone.state_dict())
    calls = []
    hooks = [h.register_forward_hook(lambda *a: calls.append(1)) for h in net.heads]
    with torch.no_grad():
        logits, where = net.predict(x)
        assert torch.equal(logits, reference(x))
        assert torch.equal(net(x), reference(x))
    assert (where == 2).all()
    assert calls == []  # closed heads do not even run
    for h in hooks:
        h.remove()


def test_threshold_zero_sends_every_sample_out_at_the_first_exit():
    net = _net(thresholds=[0.0, 0.0])
    x = torch.randn(32, *SHAPE)
    seen = []
    handle = net.backbone[3].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    with torch.no_grad():
        logits, where = net.predict(x)
        first = net.forward_all(x)[0]
    handle.remove()
    assert (where == 0).all()
    assert torch.allclose(logits, first, atol=1e-6)
    assert seen == [32]  # only forward_all ran the rest; predict stopped after exit 0


@pytest.mark.parametrize("kind", ["max-softmax", "entropy"])
def test_batched_inference_equals_per_sample(kind):
    net = _net(head="conv-pool-linear")
    x = torch.randn(64, *SHAPE)
    with torch.no_grad():
        all_conf = [confidence(z, kind) for z in net.forward_all(x)[:2]]
    # thresholds at the medians: about half the samples leave at each exit
    t = [float(c.median()) + 1e-4 for c in all_conf]
    net.set_thresholds_(t, kind)
    with torch.no_grad():
        logits, where = net.predict(x)
        singles = [net.predict(x[i : i + 1]) for i in range(len(x))]
    assert set(where.tolist()) == {0, 1, 2}  # every exit used: a real test of the batching
    assert torch.equal(where, torch.cat([s.exit_index for s in singles]))
    assert torch.allclose(logits, torch.cat([s.logits for s in singles]), atol=1e-5)


def test_samples_that_leave_stop_being_computed():
    net = _net()
    x = torch.randn(40, *SHAPE)
    with torch.no_grad():
        c0 = confidence(net.forward_all(x)[0])
    net.set_thresholds_([float(c0.sort().values[30]), 1.0])  # 10 samples leave at exit 0
    sizes = []
    handle = net.backbone[5].register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    with torch.no_grad():
        _, where = net.predict(x)
    handle.remove()
    assert int((where == 0).sum()) == 10
    assert sizes == [30]


def test_confidence_measures_match_references():
    torch.manual_seed(0)
    z = torch.randn(20, 7) * 3
    p = torch.softmax(z.double(), 1).numpy()
    assert np.allclose(confidence(z, "max-softmax").numpy(), p.max(1), atol=1e-6)
    ref = 1 - entropy(p, axis=1) / math.log(7)
    assert np.allclose(confidence(z, "entropy").numpy(), ref, atol=1e-5)
    with pytest.raises(ConfigError, match="confidence='margin'"):
        confidence(z, "margin")


# hand count for small_cnn on 1x8x8 (MACs = output positions x weights per output):
#   conv 0: 8*8 positions x 8 filters x 9      =  4,608
#   conv 3: 4*4 x 16 x (8*9)                   = 18,432
#   conv 5: 4*4 x 16 x (16*9)                  = 36,864
#   fc 9:   16 x 10                            =    160
#   head 0: Linear(8, 10) = 80; head 1: Linear(16, 10) = 160
def test_expected_macs_equal_a_hand_count():
    net = _net()
    costs = exit_costs(net, SHAPE)
    assert costs.prefix == (4608, 4608 + 18432)
    assert costs.heads == (80, 160)
    assert costs.final == 4608 + 18432 + 36864 + 160
    # all open, half leave at exit 0, a quarter at exit 1
    expected = 0.5 * (4608 + 80) + 0.25 * (23040 + 240) + 0.25 * (60064 + 240)
    net.set_thresholds_([0.5, 0.5])
    assert net.expected_macs(SHAPE, [0.5, 0.25, 0.25]) == pytest.approx(expected)
    # exit 0 closed: its head is never paid for
    net.set_thresholds_([1.0, 0.5])
    assert net.expected_macs(SHAPE, [0.0, 0.5, 0.5]) == pytest.approx(
        0.5 * (23040 + 160) + 0.5 * (60064 + 160)
    )
    with pytest.raises(ConfigError, match="threshold is 1.0"):
        net.expected_macs(SHAPE, [0.5, 0.25, 0.25])


def test_model_stats_carry_expected_macs():
    net = _net()
    plain = model_stats(net, SHAPE)
    assert plain.expected_macs is None and "expected_macs" not in plain.to_dict()
    # macs count every branch (forward_all): the backbone plus both heads
    assert plain.macs == 60064 + 80 + 160
    assert sum(v[0] for v in count_macs(net, SHAPE).values()) == plain.macs
    net.set_thresholds_([0.5, 0.5]).set_exit_rates_([0.5, 0.25, 0.25])
    stats = model_stats(net, SHAPE)
    assert stats.to_dict()["expected_macs"] == pytest.approx(net.expected_macs(SHAPE))
    assert stats.expected_macs < stats.macs


def test_evaluate_exits_histogram(digits_data):
    net = _net()
    x = digits_data.test[0]
    with torch.no_grad():
        c0 = confidence(net.forward_all(x)[0])
    net.set_thresholds_([float(c0.median()), 1.0])
    report = evaluate_exits(net, digits_data.loader("test", 100), input_shape=SHAPE)
    with torch.no_grad():
        logits, where = net.predict(x)
    y = digits_data.test[1]
    assert report.counts == tuple(int((where == i).sum()) for i in range(3))
    assert report.accuracy == pytest.approx(100 * float((logits.argmax(1) == y).float().mean()))
    assert report.reference_accuracy == pytest.approx(
        100 * float((net.forward_all(x)[-1].argmax(1) == y).float().mean())
    )
    costs = exit_costs(net, SHAPE)
    assert report.expected_macs == pytest.approx(
        sum(r * c for r, c in zip(report.exit_rates, costs.leave_costs([True, False]), strict=True))
    )
    assert "expected" in report.table()


def test_latency_over_data_runs_every_sample():
    net = _net(thresholds=[0.0, 1.0])
    calls = []
    handle = net.heads[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    result = measure_latency_over(net, torch.randn(7, *SHAPE), repeats=2, warmup=3)
    handle.remove()
    assert result.samples == 7 and len(result.runs_ms_per_sample) == 2
    assert calls == [1] * (3 + 2 * 7)  # batch 1, warm-up then two passes in order
    assert result.ms_per_sample > 0


@pytest.mark.parametrize("head", ["pool-linear", "conv-pool-linear"])
def test_checkpoint_round_trip_of_a_custom_exit_model(tmp_path, head):
    net = _net(head=head, thresholds=[0.7, 0.4])
    net.set_exit_rates_([0.5, 0.3, 0.2])
    path = save_checkpoint(net, tmp_path / "exits.safetensors")
    loaded, side = load_checkpoint(path)
    assert isinstance(loaded, EarlyExitNet)
    assert side["architecture"]["wrappers"][0]["type"] == "EarlyExitNet"
    assert loaded.thresholds == (0.7, 0.4) and loaded.exit_rates == (0.5, 0.3, 0.2)
    sa, sb = net.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(32, *SHAPE)
    loaded.eval()
    with torch.no_grad():
        a, b = net.predict(x), loaded.predict(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_index, b.exit_index)


def test_zoo_exit_model_round_trip_checkpoint_and_ncz(tmp_path):
    from nncompress.io import (
        EncodeConfig,
        checkpoint_metadata,
        decode_to_checkpoint,
        save_compressed,
    )

    model = create("resnet-20", width=4).eval()
    net = attach_exits_(model, ExitConfig(after=["layer1", "layer2"]), input_shape=(1, 28, 28))
    net.set_thresholds_([0.3, 0.25], "entropy").eval()
    path = save_checkpoint(
        net, tmp_path / "r.safetensors", model_name="resnet-20", model_kwargs={"width": 4}
    )
    loaded, side = load_checkpoint(path)
    assert side["architecture"]["model"] == "resnet-20"
    assert side["architecture"]["replacements"] == {}  # the backbone itself is unchanged
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        expect = net.predict(x)
        got = loaded.eval().predict(x)
    assert torch.equal(expect.logits, got.logits) and loaded.confidence == "entropy"
    # through the compressed file: lossless coding, then back to a checkpoint
    ncz = tmp_path / "r.ncz"
    save_compressed(loaded, ncz, EncodeConfig(), checkpoint_metadata(side))
    back, _ = load_checkpoint(decode_to_checkpoint(ncz, tmp_path / "back.safetensors"))
    with torch.no_grad():
        assert torch.equal(back.eval().predict(x).logits, expect.logits)


def test_exits_compose_with_structural_changes(tmp_path):
    from nncompress.lowrank import DecomposeConfig, decompose_

    model = create("lenet-5").eval()
    decompose_(model, DecomposeConfig(method="svd", rank=8), filter=["fc1"])
    net = attach_exits_(model, ExitConfig(after=["conv2"]), input_shape=(1, 28, 28)).eval()
    path = save_checkpoint(net, tmp_path / "m.safetensors", model_name="lenet-5")
    loaded, side = load_checkpoint(path)
    assert "fc1" in side["architecture"]["replacements"]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval().forward_all(x)[0], net.forward_all(x)[0])


def test_bad_exit_points_are_named():
    model = create("resnet-20", width=4)
    shape = (1, 28, 28)
    with pytest.raises(ConfigError, match="'layer9' is not a submodule"):
        attach_exits_(model, ExitConfig(after=["layer9"]), input_shape=shape)
    with pytest.raises(ConfigError, match="'layer1.0.relu' runs 2 times"):
        attach_exits_(model, ExitConfig(after=["layer1.0.relu"]), input_shape=shape)
    with pytest.raises(ConfigError, match="does not cut the forward pass"):
        attach_exits_(model, ExitConfig(after=["layer1.0.conv1"]), input_shape=shape)
    with pytest.raises(ConfigError, match="order the forward pass runs them"):
        attach_exits_(model, ExitConfig(after=["layer2", "layer1"]), input_shape=shape)
    with pytest.raises(ConfigError, match="conv head needs a feature map"):
        attach_exits_(
            create("lenet-300-100"),
            ExitConfig(after=["fc1"], head="conv-pool-linear"),
            input_shape=shape,
        )

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class TupleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a, _ = self.pair(x)
            return self.fc(a)

    with pytest.raises(ConfigError, match="'pair' outputs tuple; an exit needs a feature map"):
        attach_exits_(TupleNet(), ExitConfig(after=["pair"]), input_shape=(4,))
    seq = nn.Sequential(nn.Linear(12, 6), nn.Unflatten(1, (2, 3)), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ConfigError, match=r"'1' outputs \(4, 2, 3\)"):
        attach_exits_(seq, ExitConfig(after=["1"]), input_shape=(12,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"after": []}, "after=.*at least one"),
        ({"after": ["a", "a"]}, "distinct"),
        ({"after": ["a"], "head": "mlp"}, "head='mlp'"),
        ({"after": ["a"], "thresholds": [1.5]}, r"thresholds\[0\]=1.5: must be in \[0, 1\]"),
        ({"after": ["a", "b"], "thresholds": [0.5]}, "need exactly 2"),
        ({"after": ["a"], "thresholds": [float("nan")]}, "must be in"),
        ({"after": ["a"], "confidence": "margin"}, "confidence='margin'"),
        ({"after": ["a"], "head_channels": 0}, "head_channels=0"),
    ],
)
def test_exit_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExitConfig(**kwargs)


def test_runtime_threshold_validation():
    net = _net()
    with pytest.raises(ConfigError, match=r"thresholds\[1\]=-0.1"):
        net.set_thresholds_([0.5, -0.1])
    with pytest.raises(ConfigError, match="need exactly 2"):
        net.set_thresholds_([0.5])
    with pytest.raises(ConfigError, match="must sum to 1"):
        net.set_exit_rates_([0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="already has exits"):
        attach_exits_(net, ExitConfig(after=["2"]), input_shape=SHAPE)
