"""Sensitivity analysis (Han 2015, Fig. 5) and per-layer sparsities derived from it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError, TrainConfig, evaluate, fit
from nncompress.prune import MagnitudeConfig, prune_
from nncompress.prune.sensitivity import (
    SensitivityResult,
    sensitivity_analysis,
    sparsities_for_budget,
    thresholds_from_sensitivity,
    write_sensitivity,
)


@pytest.fixture(scope="module")
def trained(digits_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    fit(model, digits_data.loader("train", 64), TrainConfig(epochs=4, lr=0.05))
    return model


def test_sensitivity_curves_and_files(trained, digits_data, tmp_path):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    res = sensitivity_analysis(
        trained, digits_data.loader("val", 256), sparsities=(0.0, 0.5, 0.9, 0.99)
    )
    # the model is untouched
    for k, v in trained.state_dict().items():
        assert torch.equal(v, before[k])
    assert set(res.curves) == {"0", "3", "5"}
    base = evaluate(trained, digits_data.loader("val", 256))["accuracy"]
    assert res.baseline == pytest.approx(base)
    for accs in res.curves.values():
        assert accs[0] == pytest.approx(base)  # sparsity 0 = unpruned
        assert accs[-1] <= accs[0] + 2.0  # monotone-ish: pruning 99% does not help
    assert min(accs[-1] for accs in res.curves.values()) < base - 5  # some layer is sensitive
    files = write_sensitivity(res, tmp_path)
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = SensitivityResult.from_dict(json.loads(files["json"].read_text()))
    assert again.curves == res.curves and again.params == res.params


def test_sensitivity_matches_manual_pruning(trained, digits_data):
    res = sensitivity_analysis(trained, digits_data.loader("val", 256), sparsities=(0.7,))
    import copy

    m = copy.deepcopy(trained)
    prune_(m, MagnitudeConfig(sparsity=0.7, include=("Linear",), exclude=("5",)))
    acc = evaluate(m, digits_data.loader("val", 256))["accuracy"]
    assert res.curves["3"][0] == pytest.approx(acc)


def test_thresholds_from_sensitivity():
    res = SensitivityResult(
        sparsities=[0.1, 0.5, 0.9],
        curves={"a": [90.0, 89.5, 80.0], "b": [85.0, 90.0, 89.9], "c": [70.0, 90.0, 90.0]},
        baseline=90.0,
        params={"a": 100, "b": 100, "c": 800},
    )
    assert thresholds_from_sensitivity(res, 1.0) == {"a": 0.5, "b": 0.0, "c": 0.0}
    assert thresholds_from_sensitivity(res, 5.0) == {"a": 0.5, "b": 0.9, "c": 0.0}
    assert thresholds_from_sensitivity(res.to_dict(), 50.0) == {"a": 0.9, "b": 0.9, "c": 0.9}
    drop, per = sparsities_for_budget(res, 0.5, method="uniform", max_drop_grid=[1.0, 5.0, 25.0])
    assert drop == 25.0 and per["c"] == 0.9
    # greedy, smallest loss per removed weight first: a->0.1 (free), a->0.5 (0.5/40 weights),
    # c->0.9 (20/720; c's curve is 70 from the start) reaches 0.77; the overshoot is trimmed:
    # a steps back to 0 (c alone prunes 0.72 >= 0.5)
    loss, per = sparsities_for_budget(res, 0.5)
    assert per == {"a": 0.0, "b": 0.0, "c": 0.9}
    assert loss == pytest.approx(20.0)
    # 0.8: then b->0.9 (5/90) beats a->0.9 (9.5/40); trimming a back to 0 keeps 0.81
    loss, per = sparsities_for_budget(res, 0.8)
    assert per == {"a": 0.0, "b": 0.9, "c": 0.9}
    assert loss == pytest.approx(25.0)  # b: running min of [85, 90, 89.9] is 85
    assert sum(per[n] * res.params[n] for n in per) / 1000 >= 0.8
    with pytest.raises(ConfigError, match="max_drop=-1"):
        thresholds_from_sensitivity(res, -1)
    with pytest.raises(ConfigError, match="target_sparsity=0.95"):
        sparsities_for_budget(res, 0.95)
    with pytest.raises(ConfigError, match="must be increasing"):
        sensitivity_analysis(nn.Linear(2, 2), [], sparsities=(0.5, 0.1))
