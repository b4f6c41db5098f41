"""Nonsense hyperparameters at run time (issue 19, item 7): a training loss that becomes
non-finite stops the run with an error and nothing is saved; a final accuracy at chance level
is said loudly in the report."""

from __future__ import annotations

import math

import pytest
import torch

from nncompress.cli import main
from nncompress.core.errors import TrainingError
from nncompress.data import synthetic
from nncompress.engine import TrainConfig, fit
from nncompress.models import create
from nncompress.recipe.report import at_chance, chance_warnings, report_markdown


def test_non_finite_loss_stops_training_with_an_error():
    splits = synthetic()
    model = create("lenet-300-100", in_features=64, num_classes=4)
    calls = []

    def loss_fn(out, y, x):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * (math.inf if len(calls) == 3 else 1.0)

    with pytest.raises(TrainingError, match=r"became inf at epoch 1, step 3 .* lower the learn"):
        fit(model, splits.loader("train", 32), TrainConfig(epochs=2), loss_fn=loss_fn)
    assert len(calls) == 3  # stopped at once, not after the epoch


def test_diverging_cli_training_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    argv = ["train", "--model", "lenet-300-100", "--dataset", "synthetic", "--lr", "100"]
    rc = main([*argv, "--epochs", "3", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "training diverged, nothing is saved" in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_diverging_recipe_stage_keeps_the_finished_stages(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet-300-100\ndata: synthetic\ntrain: {epochs: 1, lr: 0.05}\nstages:\n"
        "  - {stage: train}\n  - {stage: train, epochs: 3, lr: 100, momentum: 0.99, schedule: constant}\n"
    )
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "training loss became" in capsys.readouterr().err
    stages = sorted(p.name for p in (tmp_path / "run" / "stages").glob("*.safetensors"))
    assert stages == ["01-train.safetensors"]  # the diverged stage saved nothing
    assert not (tmp_path / "run" / "report.json").exists()


def test_chance_level_accuracy_is_said_loudly():
    assert at_chance(10.0, 10) and at_chance(11.9, 10) and not at_chance(12.5, 10)
    report = {
        "recipe": "r",
        "model": "lenet-300-100",
        "dataset": "fashion-mnist",
        "baseline_accuracy": 88.0,
        "final_accuracy": 10.0,
        "final_accuracy_source": "decoded model.ncz",
        "original_bytes": 1_066_440,
        "compressed_bytes": 636,
        "compression_ratio": 1676.8,
        "stages": [],
        "layers": [],
    }
    report["warnings"] = chance_warnings(report, 10)
    assert len(report["warnings"]) == 1
    assert (
        "final accuracy 10.00% is at chance level (10.0% for 10 classes)" in (report["warnings"][0])
    )
    md = report_markdown(report)
    assert md.splitlines()[2].startswith("> **WARNING: the final accuracy 10.00%")
    report["final_accuracy"] = 80.0
    assert chance_warnings(report, 10) == []


def test_chance_level_in_a_real_run_report(tmp_path, capsys):
    """A recipe that trains nothing (epochs 0) ends at chance level: report.json and the
    printed summary carry the warning."""
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet-300-100\ndata: {name: synthetic, num_classes: 2}\n"
        "train: {epochs: 0}\nstages:\n  - {stage: train}\n"
    )
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    acc = report["final_accuracy"]
    if at_chance(acc, 2):  # an untrained 2-class net scores about 50%
        assert report["warnings"] and "chance level" in report["warnings"][0]
        assert "WARNING" in capsys.readouterr().out
    else:
        assert report["warnings"] == []
