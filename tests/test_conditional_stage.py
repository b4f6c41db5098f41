"""The early_exit recipe stage: validation up front, a run through encode, resume."""

from __future__ import annotations

import pytest

from nncompress.conditional import EarlyExitNet
from nncompress.engine import load_checkpoint
from nncompress.recipe import RecipeError, load_recipe, run_recipe
from nncompress.stages.conditional import EarlyExitStageConfig


def _recipe(**stage):
    return {
        "model": "lenet-300-100",
        "data": "digits",
        "train": {"epochs": 3, "lr": 0.05},
        "stages": [
            {"stage": "train"},
            {"stage": "early_exit", "after": ["fc1"], "epochs": 1, "max_loss": 1.0, **stage},
            {"stage": "encode"},
        ],
    }


def test_stage_config_builds_the_family_configs():
    cfg = EarlyExitStageConfig(after=["fc1", "fc2"], mode="joint", weights=[0.3, 0.3, 1])
    assert cfg.algorithm.after == ("fc1", "fc2")
    assert cfg.training.weights == (0.3, 0.3, 1.0)
    assert cfg.retrain.distill.temperature == 4.0 and cfg.retrain.lr_scale == 0.5
    assert cfg.calibration.max_loss == 0.5 and cfg.calibration.confidence == "max-softmax"
    assert EarlyExitStageConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "stage, match",
    [
        ({"head": "mlp"}, "head='mlp': must be one of"),
        ({"after": []}, "after=.*must name at least one submodule"),
        ({"max_loss": -1}, r"max_loss=-1: must be in \[0, 100\]"),
        ({"mode": "all"}, "mode='all'"),
        ({"distill": "yes"}, "distill='yes': must be true or false"),
        ({"method": "anneal"}, "method='anneal'"),
    ],
)
def test_recipe_errors_name_the_field_before_work(stage, match):
    with pytest.raises(RecipeError, match=r"stages\[1\] \(early_exit\): " + match):
        load_recipe(_recipe(**stage))


def test_recipe_with_exits_runs_saves_and_encodes(tmp_path):
    report = run_recipe(load_recipe(_recipe()), tmp_path / "run", resume=False)
    stage = report["stages"][1]
    assert stage["name"] == "early_exit"
    held = stage["report"]["held_out"]
    assert held["accuracy"] >= held["reference_accuracy"] - 1.0  # the bound, on held-out
    model, side = load_checkpoint(tmp_path / "run" / "stages" / "02-early_exit.safetensors")
    assert isinstance(model, EarlyExitNet) and model.after == ("fc1",)
    assert side["architecture"]["wrappers"][0]["type"] == "EarlyExitNet"
    assert list(model.thresholds) == held["thresholds"]
    # the .ncz decodes into the exit network: the final accuracy is the exit net's
    assert report["final_accuracy"] == pytest.approx(report["stages"][2]["accuracy"])
    # a second run resumes after the last stage without redoing anything
    again = run_recipe(load_recipe(_recipe()), tmp_path / "run")
    assert again["final_accuracy"] == pytest.approx(report["final_accuracy"])
