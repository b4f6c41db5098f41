"""Pruning schedules: iterative (Han 2015), AGP (Zhu & Gupta 2017), dropout adjustment."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError, TrainConfig, evaluate
from nncompress.prune import (
    AGPConfig,
    DropoutAdjuster,
    MagnitudeConfig,
    adjusted_dropout,
    agp_prune,
    agp_sparsity,
    iteration_config,
    iterative_prune,
    pruning_masks,
)


def test_agp_cubic_values():
    s_i, s_f, t0, end = 0.1, 0.9, 10, 50
    assert agp_sparsity(0, s_i, s_f, t0, end) == s_i
    assert agp_sparsity(t0, s_i, s_f, t0, end) == s_i
    assert agp_sparsity(end, s_i, s_f, t0, end) == s_f
    assert agp_sparsity(999, s_i, s_f, t0, end) == s_f
    for t in range(t0, end + 1):
        ref = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** 3
        assert agp_sparsity(t, s_i, s_f, t0, end) == pytest.approx(ref, abs=1e-15)
    # monotone non-decreasing
    vals = [agp_sparsity(t, s_i, s_f, t0, end) for t in range(60)]
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))


def test_adjusted_dropout_formula():
    assert adjusted_dropout(0.5, 100, 25) == pytest.approx(0.25)
    assert adjusted_dropout(0.5, 784 * 300, round(0.08 * 784 * 300)) == pytest.approx(
        0.5 * math.sqrt(0.08), rel=1e-3
    )
    with pytest.raises(ValueError, match="p_original"):
        adjusted_dropout(1.5, 10, 5)


class _DropNet(nn.Module):
    """Reuses one Dropout module after two layers (like LeNet-300-100) plus one dedicated."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 6)
        self.fc3 = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)
        self.drop_last = nn.Dropout(0.2)

    def forward(self, x):
        x = self.drop(torch.relu(self.fc1(x)))
        x = self.drop(torch.relu(self.fc2(x)))
        return self.fc3(self.drop_last(x))


def test_dropout_adjuster_follows_execution_order():
    torch.manual_seed(0)
    net = _DropNet()
    adj = DropoutAdjuster(net, torch.randn(2, 10))
    assert adj.describe == {"drop": ["fc1", "fc2"], "drop_last": ["fc2"]}
    from nncompress.prune import prune_

    prune_(net, MagnitudeConfig(sparsity=0.75, include=("Linear",)))
    new = adj.apply()
    c_o = 80 + 48
    c_r = 20 + 12
    assert new["drop"] == pytest.approx(0.5 * math.sqrt(c_r / c_o))
    assert new["drop_last"] == pytest.approx(0.2 * math.sqrt(12 / 48))
    assert net.drop.p == new["drop"]
    adj.restore()
    assert net.drop.p == 0.5 and net.drop_last.p == 0.2


def test_iteration_config_geometric_and_exact_final():
    cfg = MagnitudeConfig(sparsity=0.9, per_layer={"a": 0.99})
    s = [iteration_config(cfg, i, 3).sparsity for i in (1, 2, 3)]
    assert s[-1] == 0.9
    assert s[0] == pytest.approx(1 - 0.1 ** (1 / 3))
    assert iteration_config(cfg, 3, 3).layer_rule("a") == ("sparsity", 0.99)
    q = MagnitudeConfig(q=1.0)
    assert iteration_config(q, 2, 3) is q


def _tiny(digits_data, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
    )
    from nncompress.engine import fit

    fit(model, digits_data.loader("train", 64), TrainConfig(epochs=3, lr=0.1))
    return model


def test_iterative_prune_reaches_target_and_keeps_zeros(digits_data):
    model = _tiny(digits_data)
    before = evaluate(model, digits_data.loader("val", 256))["accuracy"]
    reps = iterative_prune(
        model,
        MagnitudeConfig(sparsity=0.8),
        digits_data.loader("train", 64),
        TrainConfig(epochs=1, lr=0.1, l1=1e-5, weight_decay=1e-4, regularization_switch_epoch=0),
        iterations=2,
        val_loader=digits_data.loader("val", 256),
    )
    assert len(reps) == 2
    assert reps[0].layers["1"].kept_fraction > reps[1].layers["1"].kept_fraction
    for name, m in pruning_masks(model).items():
        w = model.get_submodule(name).weight
        assert int((w != 0).sum()) == m.numel() - round(0.8 * m.numel())
    assert model[3].p == 0.3  # restored after retraining
    assert reps[0].dropout["3"] < 0.3  # but lowered while retraining
    after = evaluate(model, digits_data.loader("val", 256))["accuracy"]
    assert after > before - 10
    with pytest.raises(ConfigError, match="iterations=0"):
        iterative_prune(model, MagnitudeConfig(q=1.0), digits_data.loader("train"), iterations=0)


def test_agp_hits_target_at_last_step(digits_data):
    model = _tiny(digits_data)
    loader = digits_data.loader("train", 128)
    cfg = AGPConfig(sparsity=0.85, initial_sparsity=0.0, frequency=3, per_layer={"4": 0.5})
    cb, _ = agp_prune(model, cfg, loader, TrainConfig(epochs=2, lr=0.1))
    total = 2 * len(loader)
    steps = [t for t, _ in cb.history]
    assert steps[-1] == total - 1
    assert steps[:3] == [0, 3, 6]
    for t, s in cb.history:
        assert s == pytest.approx(0.85 + (0.0 - 0.85) * (1 - t / (total - 1)) ** 3)
    w1, w4 = model[1].weight, model[4].weight
    assert int((w1 != 0).sum()) == w1.numel() - round(0.85 * w1.numel())
    assert int((w4 != 0).sum()) == w4.numel() - round(0.5 * w4.numel())
    with pytest.raises(ConfigError, match="initial_sparsity"):
        AGPConfig(sparsity=0.5, initial_sparsity=0.7)
