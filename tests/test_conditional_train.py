"""Training exits: the joint loss against a hand computation, heads-only keeps the backbone."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nncompress.conditional import (
    ExitConfig,
    ExitTrainConfig,
    attach_exits_,
    evaluate_exits,
    exit_loss,
    train_exits,
)
from nncompress.distill import kd_loss
from nncompress.engine import ConfigError, TrainConfig


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def test_exit_loss_matches_hand_computation():
    torch.manual_seed(0)
    outs = [torch.randn(5, 4) for _ in range(3)]
    y = torch.randint(0, 4, (5,))
    got = exit_loss([0.5, 0.3, 1.0])(outs, y, None)
    want = sum(w * F.cross_entropy(z, y) for w, z in zip([0.5, 0.3, 1.0], outs, strict=True))
    assert torch.allclose(got, want)
    kd = functools.partial(kd_loss, temperature=3.0, alpha=0.7)
    got = exit_loss([0.5, 0.3, 1.0], kd=kd)(outs, y, None)
    want = (
        0.5 * kd_loss(outs[0], outs[2], y, 3.0, 0.7)
        + 0.3 * kd_loss(outs[1], outs[2], y, 3.0, 0.7)
        + F.cross_entropy(outs[2], y)
    )
    assert torch.allclose(got, want)


def test_heads_only_training_keeps_the_backbone_bit_exact(digits_data):
    model = _cnn()
    net = attach_exits_(model, ExitConfig(after=["2"]), input_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads_before = [p.clone() for p in net.heads.parameters()]
    kd = functools.partial(kd_loss, temperature=2.0, alpha=0.5)
    hist = train_exits(
        net,
        digits_data.loader("train", 64),
        TrainConfig(epochs=2, lr=0.05),
        ExitTrainConfig(mode="heads"),
        kd=kd,
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert any(
        not torch.equal(a, b) for a, b in zip(heads_before, net.heads.parameters(), strict=True)
    )
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    assert "train_accuracy" in hist.last


def test_joint_training_learns_every_exit(digits_data):
    cfg = ExitConfig(after=["2"], head="conv-pool-linear")
    net = attach_exits_(_cnn(), cfg, input_shape=(1, 8, 8))
    w0 = net.backbone[0].weight.clone()
    train_exits(
        net,
        digits_data.loader("train", 64),
        TrainConfig(epochs=4, lr=0.05, seed=0),
        ExitTrainConfig(mode="joint", weights=(0.5, 1.0)),
    )
    assert not torch.equal(w0, net.backbone[0].weight)
    net.set_thresholds_([0.0])  # everything leaves at the exit: measures the head alone
    report = evaluate_exits(net, digits_data.loader("test", 200), input_shape=(1, 8, 8))
    assert report.counts[0] == report.samples
    assert report.exit_accuracy[0] > 40  # chance is 10%; a head after the first conv
    assert report.reference_accuracy > 85


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "all"}, "mode='all'"),
        ({"weights": (1.0, -1.0)}, r"weights\[1\]=-1.0"),
        ({"weights": (0.0, 0.0)}, "at least one"),
    ],
)
def test_exit_train_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExitTrainConfig(**kwargs)


def test_weight_count_is_checked(digits_data):
    net = attach_exits_(_cnn(), ExitConfig(after=["2"]), input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="need 2"):
        train_exits(net, digits_data.loader("train", 64), exits=ExitTrainConfig(weights=(1.0,)))
    with pytest.raises(ConfigError, match="every head has weight 0"):
        train_exits(
            net,
            digits_data.loader("train", 64),
            exits=ExitTrainConfig(mode="heads", weights=(0.0, 1.0)),
        )


def test_frozen_backbone_stays_in_eval_mode():
    net = attach_exits_(_cnn(), ExitConfig(after=["2"]), input_shape=(1, 8, 8))
    net.freeze_backbone_(True).train()
    assert net.heads.training and not net.backbone.training
    assert not any(p.requires_grad for p in net.backbone.parameters())
    net.freeze_backbone_(False)
    assert net.backbone.training and all(p.requires_grad for p in net.backbone.parameters())
