"""Recipe stages ``ecsq`` and ``soft_share`` end to end on 8x8 digits: the decoded file is
what was evaluated, lambda is chosen on the held-out split, bad options are refused."""

from __future__ import annotations

import pytest

from nncompress.recipe import RecipeError, load_recipe, run_recipe


def _recipe(stages):
    return {
        "name": "rate",
        "model": "lenet-300-100",
        "data": "digits",
        "train": {"epochs": 3, "lr": 0.05},
        "stages": [{"stage": "train"}, *stages],
    }


def test_prune_ecsq_finetune_context_encode(tmp_path):
    stages = [
        {"stage": "prune", "method": "magnitude", "sparsity": 0.8, "iterations": 1, "epochs": 1},
        {"stage": "ecsq", "bits_fc": 4, "prune": True, "lams": [0.0, 1e-7, 1e-5],
         "max_val_drop": 3.0, "fisher_batches": 2},
        {"stage": "finetune", "epochs": 1},
        {"stage": "encode", "codec": "context", "codebook_dtype": "fp16", "dense_dtype": "fp16"},
    ]  # fmt: skip
    report = run_recipe(load_recipe(_recipe(stages)), tmp_path / "run")
    ecsq = next(st for st in report["stages"] if st["name"] == "ecsq")
    cands = ecsq["report"]["candidates"]
    assert [c["lam"] for c in cands] == [0.0, 1e-7, 1e-5]
    ok = [c for c in cands if c["val_accuracy"] >= ecsq["report"]["val_accuracy_before"] - 3.0]
    assert ecsq["report"]["lam"] == min(ok, key=lambda c: c["bytes"])["lam"]
    assert report["final_accuracy"] == report["stages"][-1]["accuracy"]  # decoded == evaluated
    enc = next(st for st in report["stages"] if st["name"] == "encode")["report"]
    assert any(t["layout"] == "context" for t in enc["tensors"])


def test_soft_share_stage(tmp_path):
    stages = [
        {"stage": "soft_share", "components": 9, "tau": 1e-3, "epochs": 2, "pi_zero": 0.99,
         "lr_weights": 1e-3, "lr_means": 1e-3},
        {"stage": "finetune", "epochs": 1},
        {"stage": "encode", "codec": "context"},
    ]  # fmt: skip
    report = run_recipe(load_recipe(_recipe(stages)), tmp_path / "run")
    soft = next(st for st in report["stages"] if st["name"] == "soft_share")["report"]
    assert soft["components"] <= 9 and 0 < soft["kept"] < 1
    assert set(soft["shared_layers"]) == {"fc1", "fc2", "fc3"}


@pytest.mark.parametrize(
    "stage, field",
    [
        ({"stage": "ecsq", "lams": [-1.0]}, "lams"),
        ({"stage": "ecsq", "max_val_drop": -2}, "max_val_drop"),
        ({"stage": "ecsq", "importance": "hessian"}, "importance"),
        ({"stage": "soft_share", "components": 1}, "components"),
        ({"stage": "soft_share", "tau": 0}, "tau"),
    ],
)
def test_bad_options_are_refused_at_load(stage, field):
    with pytest.raises(RecipeError, match=field):
        load_recipe(_recipe([stage]))
