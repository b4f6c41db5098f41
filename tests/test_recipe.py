"""Recipe loading and validation: every wrong field is named, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from nncompress.engine import ConfigError
from nncompress.recipe import STAGES, RecipeError, load_recipe, quick_recipe, stage_entry

ROOT = Path(__file__).resolve().parents[1]


def _base(**changes):
    d = {
        "model": "lenet-300-100",
        "data": "digits",
        "train": {"epochs": 2, "lr": 0.05},
        "stages": [
            {"stage": "train"},
            {"stage": "prune", "sparsity": 0.5, "epochs": 1},
            {"stage": "share", "bits_fc": 4},
            {"stage": "finetune", "epochs": 1},
            {"stage": "encode"},
        ],
    }
    d.update(changes)
    return d


def test_valid_recipe_round_trips():
    r = load_recipe(_base())
    assert [s.name for s in r.stages] == ["train", "prune", "share", "finetune", "encode"]
    assert r.stages[2].config.bits_fc == 4
    assert r.stages[3].config.overrides == {"epochs": 1}
    assert r.stages[3].config.lr_scale == pytest.approx(0.1)
    again = load_recipe(r.to_dict())
    assert again.digest() == r.digest()
    assert again.to_dict() == r.to_dict()


def test_all_errors_are_collected_and_name_fields():
    bad = _base(
        train={"epochs": 2, "lr": -1},
        stages=[
            {"stage": "train", "epochs": -3},
            {"stage": "prune", "sparsity": 1.2},
            {"stage": "share", "bits_fc": 40},
            {"stage": "finetune", "lr_scale": 0},
            {"stage": "shrink"},
            {"stage": "encode", "codec": "zip"},
        ],
        extra_key=1,
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    errors = info.value.errors
    text = str(info.value)
    assert "unknown top-level key(s) ['extra_key']" in text
    assert any(e.startswith("train: lr=-1") for e in errors)
    assert any(e.startswith("stages[0] (train): epochs=-3") for e in errors)
    assert any(e.startswith("stages[1] (prune):") and "1.2" in e for e in errors)
    assert "stages[2] (share): bits_fc=40: must be in [1, 16]" in errors
    assert any(e.startswith("stages[3] (finetune): lr_scale=0") for e in errors)
    assert any(e.startswith("stages[4] (shrink): stage='shrink': unknown stage") for e in errors)
    assert any(e.startswith("stages[5] (encode): codec='zip'") for e in errors)
    assert len(errors) == 8


def test_unknown_stage_fields_and_structure_errors():
    with pytest.raises(
        RecipeError, match=r"stages\[0\] \(share\): .*unknown field\(s\) \['bitz'\]"
    ):
        load_recipe(_base(stages=[{"stage": "share", "bitz": 3}]))
    with pytest.raises(RecipeError, match="give either 'model'"):
        load_recipe({"data": "digits", "stages": [{"stage": "train"}]})
    with pytest.raises(RecipeError, match="model='lenet-7'"):
        load_recipe(_base(model="lenet-7"))
    with pytest.raises(RecipeError, match="baseline='nope.safetensors': file does not exist"):
        load_recipe({"baseline": "nope.safetensors", "stages": [{"stage": "encode"}]})
    with pytest.raises(RecipeError, match=r"stages\[0\] \(encode\): must be the last stage"):
        load_recipe(_base(stages=[{"stage": "encode"}, {"stage": "train"}]))
    with pytest.raises(RecipeError, match="stages=\\[\\]"):
        load_recipe(_base(stages=[]))


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_registry_is_explicit_and_missing_modules_are_clear(monkeypatch):
    assert set(STAGES) >= {"train", "prune", "share", "finetune", "encode", "quantize"}
    monkeypatch.setitem(STAGES, "future", ("nncompress.stages.not_written", "C", "run"))
    with pytest.raises(ConfigError, match="nncompress.stages.not_written is not available"):
        stage_entry("future")
    with pytest.raises(RecipeError, match=r"stages\[0\] \(future\): .*not available"):
        load_recipe(_base(stages=[{"stage": "future"}]))


def test_quick_caps_epochs():
    r = quick_recipe(load_recipe(_base(quick={"epochs": 1})))
    assert r.train.epochs == 1
    assert r.stages[0].config.overrides == {}  # inherits the capped base config
    assert r.stages[1].config.epochs == 1
    assert r.stages[3].config.overrides["epochs"] == 1


@pytest.mark.parametrize("name", ["deep-compression-lenet-300-100", "deep-compression-lenet-5"])
def test_shipped_recipes_are_valid(name):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert [s.name for s in r.stages] == ["train", "prune", "share", "finetune", "encode"]
    assert r.name == name


def test_digest_ignores_fields_at_default_values():
    a = load_recipe(_base())
    explicit = _base()
    explicit["stages"][2] = {"stage": "share", "bits_fc": 4, "init": "linear", "bits_conv": 8}
    b = load_recipe(explicit)
    assert a.digest() == b.digest()
    changed = _base()
    changed["stages"][2] = {"stage": "share", "bits_fc": 3}
    assert load_recipe(changed).digest() != a.digest()
    # the base training config too (a release adding a TrainConfig field keeps runs resumable)
    train_explicit = _base()
    train_explicit["train"] = {**train_explicit.get("train", {}), "restore_best": False}
    assert load_recipe(train_explicit).digest() == a.digest()
    train_changed = _base()
    train_changed["train"] = {**train_changed.get("train", {}), "restore_best": True}
    assert load_recipe(train_changed).digest() != a.digest()
