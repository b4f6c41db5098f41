"""CLI: early-exit, cascade, and eval / stats of exit models (in process, digits data)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nncompress.cli import main
from nncompress.conditional import EarlyExitNet
from nncompress.data import digits
from nncompress.engine import TrainConfig, fit, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A small and a larger digits classifier saved as checkpoints (zoo LeNet-300-100 with
    64 inputs, and a one-layer model described as a spec)."""
    from nncompress.models import create

    d = digits()
    folder = tmp_path_factory.mktemp("cond")
    torch.manual_seed(0)
    big = create("lenet-300-100", in_features=64)
    fit(big, d.loader("train", 64), TrainConfig(epochs=3, lr=0.05, seed=0))
    big_path = save_checkpoint(
        big,
        folder / "mlp.safetensors",
        model_name="lenet-300-100",
        model_kwargs={"in_features": 64},
        dataset=d.describe(),
        extra={"train_config": {"epochs": 3, "lr": 0.05}},
    )
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    fit(small, d.loader("train", 64), TrainConfig(epochs=2, lr=0.05, seed=0))
    small_path = save_checkpoint(small, folder / "small.safetensors", dataset=d.describe())
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    other_path = save_checkpoint(other, folder / "other.safetensors", dataset=d.describe())
    return {"big": big_path, "small": small_path, "other": other_path, "dir": folder}


def test_early_exit_command_then_eval_and_stats(ckpts, capsys):
    out = ckpts["dir"] / "exits.safetensors"
    args = ["early-exit", str(ckpts["big"]), "--after", "fc1", "--epochs", "1"]
    assert main([*args, "--max-loss", "1.0", "--out", str(out), "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    held = res["held_out"]
    assert held["accuracy"] >= held["reference_accuracy"] - 1.0
    assert res["test"]["names"] == ["fc1", "final"]
    model, side = load_checkpoint(out)
    assert isinstance(model, EarlyExitNet)
    assert side["metrics"]["test_accuracy"] == pytest.approx(res["test"]["accuracy"])

    assert main(["eval", str(out), "--quiet", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(res["test"]["accuracy"])
    assert sum(ev["exits"]["counts"]) == ev["exits"]["samples"]
    assert main(["eval", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "fc1" in text and "expected" in text

    assert main(["stats", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["expected_macs"] == pytest.approx(model.expected_macs((1, 8, 8)))
    assert st["latency_ms"] == {}  # random inputs would leave at arbitrary exits
    assert st["macs"] > st["expected_macs"] or not held["counts"][0]


def test_cascade_command_and_manifest(ckpts, capsys):
    manifest = ckpts["dir"] / "cascade.json"
    argv = ["cascade", str(ckpts["small"]), str(ckpts["big"]), "--max-loss", "1.0"]
    assert main([*argv, "--out", str(manifest), "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["held_out"]["accuracy"] >= res["held_out"]["reference_accuracy"] - 1.0
    assert main(["eval", str(manifest), "--quiet", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["exits"]["counts"] == res["test"]["counts"]


def test_cli_errors_name_the_problem(ckpts, capsys):
    bad = ckpts["dir"] / "x.safetensors"
    assert main(["early-exit", str(ckpts["big"]), "--after", "fc9", "--out", str(bad)]) == 2
    assert "'fc9' is not a submodule" in capsys.readouterr().err.replace("\n", "")
    argv = ["early-exit", str(ckpts["big"]), "--after", "fc1", "--max-loss", "-2"]
    assert main([*argv, "--out", str(bad)]) == 2
    assert "max_loss=-2.0" in capsys.readouterr().err.replace("\n", "")
    assert main(["cascade", str(ckpts["small"]), str(ckpts["other"]), "--quiet"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "one class count" in err and "models[1] (Sequential): 3" in err
    assert main(["cascade", str(ckpts["small"]), "--quiet"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not bad.exists()
