"""CLI smoke tests for ``nncompress prune`` / ``sensitivity`` and the ``prune`` recipe stage."""

from __future__ import annotations

import json

import pytest
import torch

from nncompress.cli import main
from nncompress.engine import ConfigError, TrainConfig, load_checkpoint
from nncompress.stages.prune import PruneStageConfig, run_prune_stage


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune_cli")
    path = d / "base.safetensors"
    rc = main(
        [
            "train", "--model", "lenet-300-100", "--dataset", "digits", "--epochs", "2",
            "--out", str(path), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    return path


def test_cli_prune_magnitude_with_dead_removal(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    rc = main(
        [
            "prune", str(digits_ckpt), "--sparsity", "0.9", "--allocate", "uniform",
            "--iterations", "2", "--retrain-epochs", "1", "--remove-dead", "--out", str(out),
            "--quiet", "--json",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert "test_accuracy_before" in report and "test_accuracy" in report
    model, side = load_checkpoint(out)
    nz = sum(int((p != 0).sum()) for p in model.parameters())
    assert nz == report["nonzeros"]
    assert side["metrics"]["test_accuracy"] == pytest.approx(report["test_accuracy"])
    w = model.fc1.weight
    assert float((w != 0).float().mean()) <= 0.1 + 1e-4  # fc1 90% pruned (rows only removed)
    assert model.fc2.in_features == model.fc1.out_features


def test_cli_prune_q_agp_and_errors(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert main(["prune", str(digits_ckpt), "--q", "1.0", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "fc1" in text and "test accuracy" in text
    base, _ = load_checkpoint(digits_ckpt)
    pruned, _ = load_checkpoint(out)
    w0 = base.fc1.weight.detach()
    expect = w0.abs() > 1.0 * w0.double().std(correction=0).item()
    assert torch.equal(pruned.fc1.weight != 0, expect)

    agp = tmp_path / "agp.safetensors"
    rc = main(
        [
            "prune", str(digits_ckpt), "--method", "agp", "--sparsity", "0.7",
            "--allocate", "uniform", "--retrain-epochs", "1", "--agp-frequency", "2",
            "--distill", "4,0.7",
            "--out", str(agp), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    m, _ = load_checkpoint(agp)
    assert int((m.fc2.weight != 0).sum()) == 30000 - round(0.7 * 30000)

    assert main(["prune", str(digits_ckpt), "--sparsity", "1.5", "--out", str(out)]) == 2
    assert "sparsity=1.5" in capsys.readouterr().err
    assert main(["prune", str(digits_ckpt), "--method", "nope", "--out", str(out)]) == 2
    capsys.readouterr()
    argv = ["prune", str(digits_ckpt), "--q", "1", "--distill", "4", "--out", str(out)]
    assert main(argv) == 2  # --distill without retraining does nothing: refused
    assert "--distill=4: does not apply here" in capsys.readouterr().err
    assert main([*argv, "--retrain-epochs", "1"]) == 2
    assert "--distill='4': expected TEMPERATURE,ALPHA" in capsys.readouterr().err
    bad = ["prune", str(digits_ckpt), "--method", "filter-l1", "--ratio", "0.5"]
    assert main([*bad, "--distill", "4,0.7", "--out", str(out)]) == 2
    assert "--distill=4,0.7: does not apply here; not with --method filter-l1" in (
        capsys.readouterr().err
    )


def test_cli_sensitivity(digits_ckpt, tmp_path, capsys):
    d = tmp_path / "sens"
    rc = main(
        ["sensitivity", str(digits_ckpt), "--out", str(d), "--sparsities", "0.5,0.9", "--quiet"]
    )
    assert rc == 0
    assert (d / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((d / "sensitivity.json").read_text())
    assert set(data["curves"]) == {"fc1", "fc2", "fc3"}
    per = json.loads((d / "per_layer.json").read_text())["per_layer"]
    assert set(per) == {"fc1", "fc2", "fc3"}
    # per_layer.json feeds straight into prune
    out = tmp_path / "s.safetensors"
    rc = main(
        [
            "prune",
            str(digits_ckpt),
            "--sparsity",
            "0.1",
            "--per-layer",
            str(d / "per_layer.json"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0


def test_stage_config_validation_and_run(digits_data, tmp_path):
    from nncompress.models import create
    from nncompress.stages.base import StageContext

    with pytest.raises(ConfigError, match="method='x'"):
        PruneStageConfig(method="x", sparsity=0.5)
    with pytest.raises(ConfigError, match="give sparsity"):
        PruneStageConfig(method="agp", q=1.0, epochs=1)
    with pytest.raises(ConfigError, match="takes final sparsities"):
        PruneStageConfig(method="agp", sparsity=0.5, epochs=1, per_layer={"fc1": {"q": 1.0}})
    with pytest.raises(ConfigError, match="unknown field"):
        PruneStageConfig.from_dict({"sparsity": 0.5, "bogus": 1})
    with pytest.raises(ConfigError, match="sparsity=1.0 for layer 'fc1'"):
        PruneStageConfig(sparsity=0.5, per_layer={"fc1": 1.0})
    cfg = PruneStageConfig.from_dict(
        {
            "sparsity": 0.9,
            "allocate": "sensitivity",
            "sensitivity_sparsities": [0.5, 0.9, 0.95, 0.98],
            "epochs": 1,
            "l1": 1e-5,
            "weight_decay": 1e-4,
            "regularization_switch_epoch": 1,
        }
    )
    assert PruneStageConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    torch.manual_seed(0)
    model = create("lenet-300-100", in_features=64, num_classes=10)
    ctx = StageContext(
        model=model, splits=digits_data, model_name="lenet-300-100",
        model_kwargs={"in_features": 64, "num_classes": 10},
        train_config=TrainConfig(epochs=1, lr=0.05), out_dir=tmp_path,
    )  # fmt: skip
    rep = run_prune_stage(ctx, cfg)
    kept = sum(r["kept"] for r in rep["layers"].values())
    total = sum(r["params"] for r in rep["layers"].values())
    assert kept / total <= 0.1 + 1e-9  # sensitivity allocation reaches the overall target
    assert set(rep["sensitivity"]["per_layer"]) == {"fc1", "fc2", "fc3"}
    assert {"val_accuracy", "test_accuracy", "nonzeros", "params"} <= set(rep)


def test_stage_distill_retrains_from_the_unpruned_teacher(digits_data, tmp_path, monkeypatch):
    import nncompress.stages.prune as stage_mod
    from nncompress.models import create
    from nncompress.stages.base import StageContext

    with pytest.raises(ConfigError, match="distill: temperature=0"):
        PruneStageConfig(sparsity=0.5, distill={"temperature": 0})
    with pytest.raises(ConfigError, match=r"distill: unknown field\(s\) \['T'\]"):
        PruneStageConfig(sparsity=0.5, distill={"T": 4})
    with pytest.raises(ConfigError, match="distill: expected a mapping, got int"):
        PruneStageConfig(sparsity=0.5, distill=4)
    torch.manual_seed(0)
    model = create("lenet-300-100", in_features=64, num_classes=10)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {"teachers": [], "calls": 0}
    real = stage_mod.distillation_loss

    def spy(teacher, cfg):
        seen["teachers"].append((teacher, cfg))
        inner = real(teacher, cfg)

        def loss_fn(out, y, x):
            seen["calls"] += 1
            return inner(out, y, x)

        return loss_fn

    monkeypatch.setattr(stage_mod, "distillation_loss", spy)
    cfg = PruneStageConfig.from_dict(
        {"sparsity": 0.8, "iterations": 2, "epochs": 1, "distill": {"temperature": 3, "alpha": 0.6}}
    )
    assert PruneStageConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    ctx = StageContext(
        model=model, splits=digits_data, model_name="lenet-300-100",
        model_kwargs={"in_features": 64, "num_classes": 10},
        train_config=TrainConfig(epochs=1, lr=0.05), out_dir=tmp_path,
    )  # fmt: skip
    run_prune_stage(ctx, cfg)
    [(teacher, kd)] = seen["teachers"]
    assert (kd.temperature, kd.alpha) == (3, 0.6)
    assert seen["calls"] > 0  # every retraining step went through the distillation loss
    assert teacher is not ctx.model and not teacher.training
    for k, v in teacher.state_dict().items():  # the teacher stayed the unpruned network
        assert torch.equal(v, dense[k]), k
