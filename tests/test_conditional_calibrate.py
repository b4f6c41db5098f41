"""Threshold calibration (exact search against brute force, loss bound) and cascades."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.conditional import (
    CalibrationConfig,
    Cascade,
    ExitConfig,
    ExitCosts,
    ExitOutputs,
    ExitTrainConfig,
    attach_exits_,
    calibrate_,
    calibrate_thresholds,
    cascade_costs,
    confidence,
    evaluate_exits,
    train_exits,
)
from nncompress.conditional.calibrate import exits_taken
from nncompress.engine import ConfigError, TrainConfig, evaluate, fit
from nncompress.stats import count_macs


def _outputs(seed: int, n: int, exits: int = 3, k: int = 4) -> ExitOutputs:
    """Random logits whose later exits are more often right (like a real exit network)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = []
    for i in range(exits):
        z = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g) * 3)
        boost = torch.rand(n, generator=g) < 0.25 + 0.3 * i
        z[boost, labels[boost]] += 3.0
        # ties and saturated confidences, as real float32 softmax outputs have
        z[: n // 10] = z[n // 10 : 2 * (n // 10)]
        z[-2:, 0] += 60.0
        logits.append(z)
    return ExitOutputs(tuple(logits), labels)


COSTS = ExitCosts(prefix=(100, 260), heads=(7, 11), final=400)


def _brute_force(outputs: ExitOutputs, costs: ExitCosts, min_correct: int, kind: str):
    """Min expected cost over every pair of thresholds (each closed or a held-out value)."""
    conf = outputs.confidences(kind)
    correct = outputs.correct()
    top = float(np.nextafter(np.float32(1), np.float32(0)))
    cands = [sorted({1.0, *(min(float(c), top) for c in conf[i])}) for i in range(2)]
    best = None
    for t in itertools.product(*cands):
        where = exits_taken(conf, t)
        got = sum(int(correct[i][where == i].sum()) for i in range(3))
        if got < min_correct:
            continue
        leave = costs.leave_costs([x < 1 for x in t])
        cost = sum(leave[i] * int((where == i).sum()) for i in range(3))
        if best is None or (cost, -got) < best:
            best = (cost, -got)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["max-softmax", "entropy"])
def test_exact_search_matches_brute_force_and_keeps_the_bound(seed, kind):
    outputs = _outputs(seed, 40)
    n = 40
    final_correct = int(outputs.correct()[2].sum())
    used = set()
    for max_loss in (0.0, 5.0, 12.5):
        cfg = CalibrationConfig(max_loss=max_loss, method="exact", confidence=kind)
        report = calibrate_thresholds(outputs, COSTS, cfg)
        min_correct = final_correct - int(max_loss * n / 100 + 1e-9)
        assert sum(report.correct) >= min_correct  # the bound holds on the calibration data
        assert report.accuracy >= report.reference_accuracy - max_loss - 1e-9
        cost, neg_got = _brute_force(outputs, COSTS, min_correct, kind)
        assert report.expected_macs * n == pytest.approx(cost)
        assert sum(report.correct) == -neg_got
        greedy = calibrate_thresholds(outputs, COSTS, CalibrationConfig(max_loss, "greedy", kind))
        assert sum(greedy.correct) >= min_correct
        assert greedy.expected_macs >= report.expected_macs - 1e-9
        # the report describes what the rule actually does on the data
        where = exits_taken(outputs.confidences(kind), report.thresholds)
        assert report.counts == tuple(int((where == i).sum()) for i in range(3))
        used.update(i for i in range(2) if report.counts[i])
    assert used == {0, 1}  # the searches did open both exits somewhere


def test_zero_loss_budget_and_open_exits_pay_for_heads():
    outputs = _outputs(0, 200)
    report = calibrate_thresholds(outputs, COSTS, CalibrationConfig(max_loss=0.0))
    assert report.accuracy >= report.reference_accuracy
    # a cost model where heads are dearer than the savings: every exit stays closed
    dear = ExitCosts(prefix=(390, 395), heads=(50, 50), final=400)
    closed = calibrate_thresholds(outputs, dear, CalibrationConfig(max_loss=50.0))
    assert closed.thresholds == (1.0, 1.0) and closed.counts[2] == 200
    assert closed.expected_macs == 400


def test_grid_and_combination_limit():
    outputs = _outputs(1, 300, exits=4)
    costs = ExitCosts(prefix=(50, 100, 200), heads=(3, 3, 3), final=400)
    with pytest.raises(ConfigError, match="max_combinations.*set grid="):
        calibrate_thresholds(outputs, costs, CalibrationConfig(max_loss=2.0, max_combinations=1000))
    coarse = calibrate_thresholds(outputs, costs, CalibrationConfig(max_loss=2.0, grid=8))
    greedy = calibrate_thresholds(outputs, costs, CalibrationConfig(max_loss=2.0, method="greedy"))
    for r in (coarse, greedy):
        assert r.accuracy >= r.reference_accuracy - 2.0 - 1e-9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_loss": -1}, "max_loss=-1"),
        ({"method": "anneal"}, "method='anneal'"),
        ({"confidence": "margin"}, "confidence='margin'"),
        ({"grid": 1}, "grid=1"),
        ({"reference_accuracy": 120.0}, "reference_accuracy=120.0"),
    ],
)
def test_calibration_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CalibrationConfig(**kwargs)


@pytest.fixture(scope="module")
def digits_pair(digits_data):
    """A weak and a strong classifier on digits (cascade members), trained for seconds."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    big = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    for m, epochs in ((small, 2), (big, 5)):
        fit(m, digits_data.loader("train", 64), TrainConfig(epochs=epochs, lr=0.05, seed=0))
    return small.eval(), big.eval()


def test_cascade_predicts_like_its_members(digits_pair, digits_data):
    small, big = digits_pair
    x = digits_data.test[0]
    with torch.no_grad():
        zs, zb = small(x), big(x)
        cs = confidence(zs)
        t = float(cs.median())
        logits, where = Cascade([small, big], [t]).eval().predict(x)
        leave = cs >= t
        assert torch.equal(where, (~leave).long())
        assert torch.allclose(logits[leave], zs[leave]) and torch.allclose(
            logits[~leave], zb[~leave]
        )
        assert torch.equal(Cascade([small, big], [1.0]).eval()(x), zb)  # closed: big only
        assert torch.equal(Cascade([small, big], [0.0]).eval()(x), zs)  # everything stops early


def test_cascade_calibration_on_held_out(digits_pair, digits_data):
    small, big = digits_pair
    cascade = Cascade([small, big], input_shape=(1, 8, 8))
    cfg = CalibrationConfig(max_loss=1.0)
    report = calibrate_(cascade, digits_data.loader("val", 64), cfg, input_shape=(1, 8, 8))
    assert report.accuracy >= report.reference_accuracy - 1.0
    assert cascade.thresholds == report.thresholds and cascade.exit_rates == report.exit_rates
    # running the calibrated cascade on the same data reproduces the report
    again = evaluate_exits(cascade, digits_data.loader("val", 200), input_shape=(1, 8, 8))
    assert again.counts == report.counts and again.accuracy == pytest.approx(report.accuracy)
    macs = [sum(v[0] for v in count_macs(m, (1, 8, 8)).values()) for m in (small, big)]
    assert cascade_costs([small, big], (1, 8, 8)) == ExitCosts((0,), (macs[0],), macs[1])
    if report.thresholds[0] < 1:
        assert report.costs == (macs[0], macs[0] + macs[1])
    assert report.expected_macs == pytest.approx(cascade.expected_macs((1, 8, 8)))


def test_cascade_errors(digits_pair):
    small, big = digits_pair
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ConfigError, match=r"one class count.*models\[1\] \(Sequential\): 3"):
        Cascade([small, other], input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="one class count"):
        Cascade([small, other]).eval().forward_all(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="at least 2 models"):
        Cascade([small])
    with pytest.raises(ConfigError, match=r"thresholds\[0\]=2.0"):
        Cascade([small, big], [2.0])


def test_calibrating_an_exit_network_keeps_the_bound_on_its_data(digits_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    fit(model, digits_data.loader("train", 64), TrainConfig(epochs=4, lr=0.05, seed=0))
    net = attach_exits_(model, ExitConfig(after=["1"]), input_shape=(1, 8, 8))
    train_exits(
        net,
        digits_data.loader("train", 64),
        TrainConfig(epochs=3, lr=0.05),
        ExitTrainConfig(mode="heads"),
    )
    val = digits_data.loader("val", 64)
    for method in ("exact", "greedy"):
        report = calibrate_(
            net, val, CalibrationConfig(max_loss=2.0, method=method), input_shape=(1, 8, 8)
        )
        measured = evaluate(net, val)["accuracy"]  # the deployed rule, batch by batch
        assert measured == pytest.approx(report.accuracy)
        assert measured >= report.reference_accuracy - 2.0


def test_cascade_manifest_round_trip_and_tamper(digits_pair, digits_data, tmp_path):
    from nncompress.conditional import load_cascade, save_cascade
    from nncompress.engine import save_checkpoint

    small, big = digits_pair
    paths = [save_checkpoint(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate((small, big))]
    cascade = Cascade([small, big], [0.8], "entropy", [0.6, 0.4])
    manifest = save_cascade(cascade, tmp_path / "cascade.json", paths)
    loaded, info = load_cascade(manifest)
    assert info["members"][0]["path"] == "m0.safetensors"  # relative to the manifest
    assert loaded.thresholds == (0.8,) and loaded.confidence == "entropy"
    assert loaded.exit_rates == (0.6, 0.4)
    x = digits_data.test[0]
    with torch.no_grad():
        a, b = cascade.eval().predict(x), loaded.predict(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_index, b.exit_index)
    save_checkpoint(big, paths[0])  # a member replaced after calibration
    with pytest.raises(ConfigError, match=r"members\[0\].*changed"):
        load_cascade(manifest)
    with pytest.raises(ConfigError, match=r"members\[1\]='nope.safetensors': no such"):
        save_cascade(cascade, tmp_path / "c2.json", [paths[0], "nope.safetensors"])
