"""The ``pq`` recipe stage: train -> pq -> encode on 8x8 digits, the decoded file, and resume."""

from __future__ import annotations

import pytest
import torch

from nncompress.core import ConfigError
from nncompress.engine import load_checkpoint
from nncompress.io import decode_file, inspect_file
from nncompress.io.checkpoint import model_from_metadata
from nncompress.quant import pq_layers
from nncompress.recipe import load_recipe, run_recipe
from nncompress.stages.pq import PQStageConfig

PQ = {
    "stage": "pq",
    "k": 16,
    "block_size_fc": 8,
    "per_layer_block_size": {"fc2": 10, "fc3": 4},
    "em_iters": 5,
    "calibration": 256,
    "batch_size": 64,
    "calibration_batches": 2,
    "layer_steps": 3,
    "global_steps": 3,
    "bn_batches": 0,
}


def _recipe(stages):
    return {
        "name": "tiny-pq",
        "model": "lenet-300-100",
        "data": "digits",
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "stages": stages,
    }


def _distinct_blocks(w: torch.Tensor, d: int) -> int:
    return torch.unique(w.detach().reshape(-1, d), dim=0).shape[0]


def test_train_pq_encode(tmp_path, digits_data):
    stages = [{"stage": "train"}, PQ, {"stage": "encode", "codec": "ans"}]
    report = run_recipe(load_recipe(_recipe(stages)), tmp_path)
    assert report["final_accuracy_source"] == "decoded model.ncz"
    assert report["final_accuracy"] > 20  # 10 classes: a working (if coarse) model
    rep = inspect_file(tmp_path / "model.ncz")
    assert rep.total_bytes == (tmp_path / "model.ncz").stat().st_size
    layers = {r["name"]: r for r in report["stages"][1]["report"]["layers"]}
    for name, d in (("fc1", 8), ("fc2", 10), ("fc3", 4)):
        t = rep.tensor(f"{name}.weight")
        assert t.scheme == "pq" and t.block_size == d and t.codebook_size <= 16
        assert layers[name]["block_size"] == d
    assert [r["scheme"] for r in report["layers"][:3]] == ["pq"] * 3
    state, meta = decode_file(tmp_path / "model.ncz")
    model, _ = model_from_metadata(meta)
    model.load_state_dict(state)


def test_resume_after_pq_rebuilds_the_codebooks(tmp_path, digits_data):
    stages = [{"stage": "train"}, PQ, {"stage": "finetune", "epochs": 1}]
    recipe = load_recipe(_recipe(stages))
    first = run_recipe(recipe, tmp_path)
    last = tmp_path / first["stages"][2]["checkpoint"]
    last.unlink()  # interrupted during the fine-tuning
    last.with_suffix(".json").unlink()
    run_recipe(recipe, tmp_path)
    pqd, _ = load_checkpoint(tmp_path / first["stages"][1]["checkpoint"])
    final, _ = load_checkpoint(last)
    for name, d in (("fc1", 8), ("fc2", 10), ("fc3", 4)):
        # the resumed fine-tuning trained codewords, not free weights
        assert _distinct_blocks(getattr(final, name).weight, d) <= 16
        assert not torch.equal(getattr(final, name).weight, getattr(pqd, name).weight)


def test_stage_config_validation():
    with pytest.raises(ConfigError, match="calibration=0"):
        PQStageConfig(calibration=0)
    with pytest.raises(ConfigError, match="k=0"):
        PQStageConfig(k=0)
    assert PQStageConfig(exclude=["conv1"]).exclude == ("conv1",)
    assert not pq_layers(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory, digits_data):
    from nncompress.cli.basic import train_model
    from nncompress.engine import TrainConfig

    path = tmp_path_factory.mktemp("pqcli") / "mlp.safetensors"
    torch.manual_seed(0)
    train_model("lenet-300-100", digits_data, TrainConfig(epochs=3, lr=0.1), path)
    return path


def test_cli_quantize_pq_and_inspect(digits_ckpt, tmp_path, capsys):
    import json

    from nncompress.cli import main

    ncz = tmp_path / "mlp.ncz"
    args = ["quantize", str(digits_ckpt), "--method", "pq", "--k", "16", "--calibration", "256"]
    args += ["--layer-steps", "3", "--global-steps", "3", "--out", str(ncz), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["file_bytes"] == ncz.stat().st_size
    assert res["accuracy_before"] > 85 and res["accuracy_after"] > 50
    assert [r["scheme"] for r in res["layers"]] == ["pq"] * 3
    assert [r["d"] for r in res["layers"]] == [4, 4, 4]
    assert main(["inspect", str(ncz)]) == 0
    text = capsys.readouterr().out
    assert "pq" in text and "bits/w" in text
    # bad input: refused before any work, with the field named
    bad = ["quantize", str(digits_ckpt), "--method", "pq", "--out", str(tmp_path / "x.onnx")]
    assert main(bad) == 2
    assert ".ncz" in capsys.readouterr().err
    bad = ["quantize", str(digits_ckpt), "--method", "pq", "--block-size", "9,7,7"]
    assert main([*bad, "--out", str(tmp_path / "y.ncz")]) == 2
    assert "block_size=7 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "y.ncz").exists()
    with pytest.raises(SystemExit):
        main([*bad[:-1], "tiny", "--out", str(tmp_path / "y.ncz")])
