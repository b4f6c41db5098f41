"""decompose_ on whole models: full-rank equivalence, checkpoint round trips, rank rules and
budgets, skipping, the recipe stage and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nncompress.engine import TrainConfig, evaluate, load_checkpoint, save_checkpoint
from nncompress.lowrank import DecomposeConfig, TTConv2d, TTLinear, decompose_
from nncompress.models import create
from nncompress.stats import count_macs


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on shared cores
    yield
    torch.set_num_threads(n)


def _macs(m: nn.Module, shape: tuple[int, ...]) -> int:
    return sum(v[0] for v in count_macs(m, shape).values())


def _conv_macs(m: nn.Module, shape: tuple[int, ...]) -> int:
    convs = {n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)}
    return sum(v[0] for n, v in count_macs(m, shape).items() if n in convs)


@pytest.fixture()
def lenet5() -> nn.Module:
    torch.manual_seed(0)
    return create("lenet-5").eval()


@pytest.mark.parametrize("method", ["svd", "separable", "tucker2"])
def test_full_rank_is_exact_and_skipped_by_decompose(method):
    """Full-rank factors reproduce the model exactly, and decompose_ skips them (no saving)."""
    from nncompress.lowrank import separable_conv, svd_linear, tucker2_conv
    from nncompress.lowrank.separable import separable_full_rank

    torch.manual_seed(1)
    name = "lenet-300-100" if method == "svd" else "lenet-5"
    model = create(name, **({"in_features": 64} if method == "svd" else {})).eval()
    shape = (64,) if method == "svd" else (1, 28, 28)
    x = torch.randn(4, *shape)
    ref = model(x)
    report = decompose_(copy.deepcopy(model), DecomposeConfig(method=method, rank=10_000))
    assert not report.decomposed
    # every layer is reported: no saving at full rank, or not a layer type the method takes
    assert all(
        "no reduction" in e.reason or e.reason == "not a Conv2d layer" for e in report.layers
    )
    for layer_name, layer in list(model.named_children()):
        if method == "svd" and isinstance(layer, nn.Linear):
            new = svd_linear(layer, min(layer.weight.shape))
        elif method == "separable" and isinstance(layer, nn.Conv2d):
            new = separable_conv(layer, separable_full_rank(layer))
        elif method == "tucker2" and isinstance(layer, nn.Conv2d):
            new = tucker2_conv(layer, tuple(layer.weight.shape[:2]))
        else:
            continue
        setattr(model, layer_name, new)
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_decompose_report_and_replacement_structure(lenet5):
    x = torch.randn(2, 1, 28, 28)
    report = decompose_(lenet5, DecomposeConfig(method="tucker2", rank=4), input_shape=(1, 28, 28))
    assert report.decomposed == ["conv1", "conv2"]
    conv1 = next(x for x in report.layers if x.name == "conv1")
    assert conv1.rank == [4, 1] and conv1.full_rank == [20, 1]  # ranks clamped to C_in = 1
    assert isinstance(lenet5.conv2, nn.Sequential) and len(lenet5.conv2) == 3
    assert report.params_after < report.params_before
    assert report.macs_after == _conv_macs(lenet5, (1, 28, 28))
    assert lenet5(x).shape == (2, 10)
    entry = next(x for x in report.layers if x.name == "conv2")
    assert entry.rank == [4, 4] and entry.full_rank == [50, 20] and 0 < entry.rel_error < 1


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("lenet-300-100", DecomposeConfig(method="svd", rank_fraction=0.25)),
        ("lenet-5", DecomposeConfig(method="tucker2", rank=6)),
        ("lenet-5", DecomposeConfig(method="cp", rank=6, cp_iters=10)),
        ("lenet-5", DecomposeConfig(method="separable", rank=4)),
        ("lenet-300-100", DecomposeConfig(method="tt", rank=6, require_fewer_macs=False)),
        ("lenet-5", DecomposeConfig(method="tt", rank=4, require_fewer_macs=False)),
    ],
)
def test_checkpoint_round_trip_with_load_checkpoint_alone(tmp_path, name, cfg):
    torch.manual_seed(2)
    model = create(name).eval()
    report = decompose_(model, cfg, input_shape=(1, 28, 28))
    assert report.decomposed
    x = torch.randn(3, 1, 28, 28)
    ref = model(x)
    path = save_checkpoint(model, tmp_path / "m.safetensors", model_name=name, model_kwargs={})
    loaded, sidecar = load_checkpoint(path)
    assert sidecar["architecture"]["replacements"]
    torch.testing.assert_close(loaded.eval()(x), ref, atol=0, rtol=0)
    if cfg.method == "tt" and name == "lenet-300-100":
        assert isinstance(loaded.fc1, TTLinear)
    elif cfg.method == "tt":
        assert isinstance(loaded.conv2, TTConv2d) and isinstance(loaded.fc1, TTLinear)


def test_custom_sequential_round_trip(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 40))
    decompose_(model, DecomposeConfig(method="tucker2", rank=4))
    decompose_(model, DecomposeConfig(method="svd", rank=5), filter=["3"])
    x = torch.randn(2, 3, 8, 8)
    path = save_checkpoint(model.eval(), tmp_path / "seq.safetensors")
    loaded, _ = load_checkpoint(path)
    torch.testing.assert_close(loaded.eval()(x), model(x), atol=0, rtol=0)


def test_macs_budget_is_met_and_ranks_follow_spectra():
    torch.manual_seed(4)
    model = create("resnet-20", width=4).eval()
    shape = (1, 12, 12)
    before = _conv_macs(model, shape)
    cfg = DecomposeConfig(method="tucker2", macs_budget=0.5)
    report = decompose_(model, cfg, filter="layer*.conv*", input_shape=shape)
    assert report.budget_met and 0 < report.knob < 1
    assert report.macs_after <= 0.5 * report.macs_before
    after = _conv_macs(model, shape)
    assert before - after == report.macs_before - report.macs_after  # analytic == counted
    assert model(torch.randn(1, *shape)).shape == (1, 10)


def test_params_budget_svd():
    torch.manual_seed(5)
    model = create("lenet-300-100", in_features=64)
    report = decompose_(model, DecomposeConfig(method="svd", params_budget=0.3), input_shape=(64,))
    assert report.params_after <= 0.3 * report.params_before
    total = sum(p.numel() for p in model.parameters())
    assert total == report.params_after  # every Linear was targeted


def test_energy_and_vbmf_rules_pick_the_known_rank():
    g = torch.Generator().manual_seed(6)
    lin = nn.Linear(60, 40, bias=False)
    u, v = torch.randn(40, 3, generator=g), torch.randn(3, 60, generator=g)
    with torch.no_grad():
        lin.weight.copy_(u @ v * 3 + 0.01 * torch.randn(40, 60, generator=g))
    for cfg in (
        DecomposeConfig(method="svd", energy=0.999),
        DecomposeConfig(method="svd", vbmf=True),
    ):
        model = nn.Sequential(lin)
        report = decompose_(model, cfg)
        assert report.layers[0].rank == [3], cfg


def test_per_layer_overrides_and_skip(lenet5):
    cfg = DecomposeConfig(
        method="svd",
        rank=8,
        per_layer={"fc2": {"skip": True}, "conv2": {"method": "tucker2", "rank": 5}},
    )
    report = decompose_(lenet5, cfg, input_shape=(1, 28, 28))
    by_name = {x.name: x for x in report.layers}
    assert by_name["fc1"].status == "decomposed" and by_name["fc1"].rank == [8]
    assert by_name["fc2"].status == "skipped" and by_name["fc2"].reason == "per_layer skip"
    assert by_name["conv2"].method == "tucker2" and by_name["conv2"].rank == [5, 5]
    assert isinstance(lenet5.fc2, nn.Linear) and isinstance(lenet5.conv2, nn.Sequential)


def test_tt_skipped_when_macs_grow_unless_allowed():
    torch.manual_seed(7)
    model = create("lenet-300-100")
    report = decompose_(model, DecomposeConfig(method="tt", rank=8), input_shape=(1, 28, 28))
    fc1 = next(x for x in report.layers if x.name == "fc1")
    assert fc1.status == "skipped" and "MACs" in fc1.reason
    assert isinstance(model.fc1, nn.Linear)


def test_stage_decompose_and_distill_finetune(digits_data, tmp_path):
    from nncompress.engine import fit
    from nncompress.stages.base import StageContext
    from nncompress.stages.decompose import DecomposeStageConfig, run_decompose_stage

    torch.manual_seed(8)
    model = create("lenet-300-100", in_features=64)
    cfg = TrainConfig(epochs=4, lr=0.1, batch_size=64)
    fit(model, digits_data.loader("train", 64), cfg)
    ctx = StageContext(model, digits_data, "lenet-300-100", {"in_features": 64}, cfg, tmp_path)
    stage = DecomposeStageConfig.from_dict(
        {"method": "svd", "rank": 2, "layers": ["fc1"], "finetune_epochs": 3}
    )
    assert DecomposeStageConfig.from_dict(stage.to_dict()) == stage
    test = digits_data.loader("test", 512)
    res = run_decompose_stage(ctx, stage)
    assert res["params_after"] < res["params_before"] and res["finetune_loss"] == "distillation"
    assert isinstance(ctx.model.fc1, nn.Sequential)
    # fine-tuning must beat the un-finetuned rank-2 model
    torch.manual_seed(8)
    raw = create("lenet-300-100", in_features=64)
    fit(raw, digits_data.loader("train", 64), cfg)
    decompose_(raw, DecomposeConfig(method="svd", rank=2), filter=["fc1"])
    assert evaluate(ctx.model, test)["accuracy"] > evaluate(raw, test)["accuracy"]


def test_stage_config_errors():
    from nncompress.engine import ConfigError
    from nncompress.stages.decompose import DecomposeStageConfig

    with pytest.raises(ConfigError, match="finetune_epochs=-1"):
        DecomposeStageConfig.from_dict({"method": "svd", "rank": 2, "finetune_epochs": -1})
    with pytest.raises(ConfigError, match="temperature"):
        DecomposeStageConfig.from_dict({"method": "svd", "rank": 2, "temperature": 0})


def test_cli_decompose_and_stats(digits_data, tmp_path, capsys):
    from nncompress.cli import main
    from nncompress.engine import fit

    torch.manual_seed(9)
    model = create("lenet-300-100", in_features=64)
    fit(model, digits_data.loader("train", 64), TrainConfig(epochs=2, lr=0.1, batch_size=64))
    src = save_checkpoint(
        model,
        tmp_path / "base.safetensors",
        model_name="lenet-300-100",
        model_kwargs={"in_features": 64},
        dataset=digits_data.describe(),
    )
    out = tmp_path / "svd.safetensors"
    rc = main(
        [
            "decompose",
            str(src),
            "--method",
            "svd",
            "--rank",
            "4",
            "--layers",
            "fc1",
            "fc2",
            "--finetune-epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--json",
        ]
    )
    assert rc == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert [x["name"] for x in result["layers"] if x["status"] == "decomposed"] == ["fc1", "fc2"]
    assert result["params_after"] == 4 * (64 + 300) + 300 + 4 * (300 + 100) + 100
    loaded, sidecar = load_checkpoint(out)
    assert isinstance(loaded.fc2, nn.Sequential)
    assert sidecar["metrics"]["test_accuracy"] == pytest.approx(result["test_accuracy_after"])
    assert main(["stats", str(out), "--batches", "1", "--repeats", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["params"] == sum(p.numel() for p in loaded.parameters())
    # bad input is refused with the field named
    rc = main(["decompose", str(src), "--method", "svd", "--energy", "1.5", "--out", str(out)])
    assert rc == 2
    assert "energy=1.5" in capsys.readouterr().err


def test_recipe_with_decompose_stage(tmp_path):
    from nncompress.recipe import run_recipe

    recipe = {
        "name": "tiny-lowrank",
        "model": "lenet-300-100",
        "data": "digits",
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "stages": [
            {"stage": "train"},
            {
                "stage": "decompose",
                "method": "svd",
                "rank": 8,
                "layers": ["fc1"],
                "finetune_epochs": 1,
            },
        ],
    }
    report = run_recipe(recipe, tmp_path)
    names = [s["name"] for s in report["stages"]]
    assert names == ["train", "decompose"]
    fields = report["stages"][1]["report"]
    assert (
        fields["layers"]["fc1"]["rank"] == [8] and fields["params_after"] < fields["params_before"]
    )
    ckpt = sorted((tmp_path / "stages").glob("*decompose*.safetensors"))[-1]
    model, _ = load_checkpoint(ckpt)
    assert isinstance(model.fc1, nn.Sequential) and model.fc1[0].out_features == 8


def test_tt_conv_in_decompose_counts_macs_and_params():
    """TT of a conv (Garipov 2016): the report's analytic params/MACs match the model's."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten())
    shape = (8, 10, 10)
    report = decompose_(model, DecomposeConfig(method="tt", rank=3), input_shape=shape)
    (layer,) = report.layers
    assert layer.status == "decomposed" and isinstance(model[0], TTConv2d), layer.reason
    assert model[0].tt.in_modes[0] == 9 and model[0].tt.out_modes[0] == 1  # spatial core
    assert sum(p.numel() for p in model.parameters()) == layer.params_after < layer.params_before
    assert _macs(model, shape) == layer.macs_after < layer.macs_before
    assert model(torch.randn(2, *shape)).shape == (2, 16 * 100)
