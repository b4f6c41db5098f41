"""The ``quantize`` command, ``eval``/``stats`` on ONNX files, and the ``quantize`` recipe stage."""

from __future__ import annotations

import json

import pytest
import torch

from nncompress.cli import main
from nncompress.engine import ConfigError, TrainConfig, load_checkpoint, save_checkpoint
from nncompress.models import create
from nncompress.stages.base import StageContext
from nncompress.stages.quantize import QuantizeStageConfig, run_quantize_stage


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits_data):
    from nncompress.cli.basic import train_model

    path = tmp_path_factory.mktemp("q") / "mlp.safetensors"
    torch.manual_seed(0)
    train_model("lenet-300-100", digits_data, TrainConfig(epochs=3, lr=0.1), path)
    return path


def test_quantize_eval_stats_commands(ckpt, tmp_path, capsys):
    onnx_path = tmp_path / "mlp.onnx"
    rc = main(["quantize", str(ckpt), "--out", str(onnx_path), "--calibration", "128", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy_before"] > 85
    assert abs(res["accuracy_after"] - res["accuracy_before"]) < 3
    # int8 weights: ~4x smaller; on this 50k-weight MLP the per-channel scales and int32
    # biases are a visible overhead
    assert res["compression"] > 3.2
    assert [r["weights"] for r in res["layers"]] == ["int8"] * 3
    assert res["coverage"]["changed"] == ["fc1", "fc2", "fc3"] and not res["coverage"]["skipped"]
    assert main(["eval", str(onnx_path), "--json", "--quiet"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(res["accuracy_after"])
    assert main(["stats", str(onnx_path), "--json", "--repeats", "3"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["file_bytes"] == onnx_path.stat().st_size
    assert st["macs"] == 64 * 300 + 300 * 100 + 100 * 10
    assert set(st["latency_ms"]) == {"batch_1", "batch_64"}
    assert main(["stats", str(onnx_path), "--repeats", "2"]) == 0  # table output
    assert "MACs per sample" in capsys.readouterr().out


def test_quantize_qat_int4_command(ckpt, tmp_path, capsys):
    onnx_path = tmp_path / "mlp4.onnx"
    args = [
        "quantize",
        str(ckpt),
        "--method",
        "qat",
        "--weights",
        "int4",
        "--qat-epochs",
        "1",
        "--keep-first-last",
        "int8",
        "--out",
        str(onnx_path),
        "--quiet",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "layer precisions" in text and "int4" in text and "smaller" in text
    # the coverage summary: every layer quantized, none skipped
    assert "quantize: changed 3 layer(s)" in " ".join(text.split()) and "skipped 0" in text


def test_quantize_command_errors(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), "--out", str(tmp_path / "x.bin")]) == 2
    assert "must end in .onnx" in " ".join(capsys.readouterr().err.split())


def test_quantize_stage_leaves_a_saveable_model(tmp_path, digits_data):
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1}
    model = create("resnet-20", **kwargs).eval()
    ctx = StageContext(
        model=model,
        splits=digits_data,
        model_name="resnet-20",
        model_kwargs=kwargs,
        train_config=TrainConfig(epochs=1),
        out_dir=tmp_path,
    )
    rep = run_quantize_stage(ctx, QuantizeStageConfig(calibration=64, observer="percentile"))
    assert ctx.artifacts["onnx"].is_file() and rep["onnx_bytes"] > 0
    assert abs(rep["accuracy_onnx"] - rep["accuracy_sim"]) < 10
    # the model left behind carries integer-grid weights and round-trips through a checkpoint
    save_checkpoint(
        ctx.model, tmp_path / "q.safetensors", model_name="resnet-20", model_kwargs=kwargs
    )
    back, _ = load_checkpoint(tmp_path / "q.safetensors")
    x = digits_data.test[0][:8]
    assert torch.allclose(back.eval()(x), ctx.model(x), atol=1e-5)
    with pytest.raises(ConfigError, match="method='int8'"):
        QuantizeStageConfig(method="int8")
    with pytest.raises(ConfigError, match="out='m.pt'"):
        QuantizeStageConfig(out="m.pt")
