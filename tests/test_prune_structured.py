"""Filter pruning (Li et al. 2017): scores, selection, MAC budget, config validation, retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError, TrainConfig, evaluate, finetune, fit
from nncompress.models import create
from nncompress.prune.graph import build_dependency_graph
from nncompress.prune.structured import (
    FilterPruneConfig,
    filter_norms,
    group_scores,
    plan_filters,
    prune_filters_,
)
from nncompress.stats import count_macs
from prune_nets import InceptionNet, ResNet18ish, TinyTransformerMLP


def test_filter_norms_match_numpy():
    w = torch.randn(6, 3, 3, 3)
    ref1 = np.abs(w.numpy()).reshape(6, -1).sum(1)
    ref2 = np.linalg.norm(w.numpy().reshape(6, -1), axis=1)
    np.testing.assert_allclose(filter_norms(w, 1).numpy(), ref1, rtol=1e-6)
    np.testing.assert_allclose(filter_norms(w, 2).numpy(), ref2, rtol=1e-6)
    with pytest.raises(ValueError, match="p=3"):
        filter_norms(w, 3)


def test_coupled_scores_are_sums_of_member_filter_norms():
    model = ResNet18ish()
    g = build_dependency_graph(model, torch.randn(1, 3, 16, 16))
    scores = group_scores(model, g, "l1")
    grp = g.group_of("layer2.0.conv2")
    expected = sum(
        filter_norms(model.get_submodule(n).weight).numpy()
        for n in ("layer2.0.conv2", "layer2.0.down.0", "layer2.1.conv2")
    )
    np.testing.assert_allclose(scores[grp.index], expected, rtol=1e-6)
    largest = group_scores(model, g, "largest")
    np.testing.assert_allclose(largest[grp.index], -expected, rtol=1e-6)


def _chain() -> nn.Sequential:
    """conv(1->6) with filter L1 norms 1..6 in a scrambled order."""
    net = nn.Sequential(nn.Conv2d(1, 6, 1, bias=False), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([4.0, 1.0, 6.0, 2.0, 5.0, 3.0]).view(6, 1, 1, 1))
    return net


@pytest.mark.parametrize(
    ("criterion", "expected"), [("l1", [1, 3, 5]), ("l2", [1, 3, 5]), ("largest", [0, 2, 4])]
)
def test_selection_by_criterion(criterion, expected):
    net = _chain()
    chosen = plan_filters(net, FilterPruneConfig(criterion, ratio=0.5), torch.randn(1, 1, 2, 2))
    assert chosen.plan == {"0": expected}


def test_random_is_seeded():
    x = torch.randn(1, 1, 2, 2)
    a = plan_filters(_chain(), FilterPruneConfig("random", ratio=0.5, seed=1), x).plan
    b = plan_filters(_chain(), FilterPruneConfig("random", ratio=0.5, seed=1), x).plan
    c = [
        plan_filters(_chain(), FilterPruneConfig("random", ratio=0.5, seed=s), x).plan
        for s in range(2, 8)
    ]
    assert a == b and len(a["0"]) == 3 and any(p != a for p in c)


def test_layer_ratio_min_channels_and_exclude():
    model = create("resnet-20", width=8)
    x = torch.randn(1, 1, 12, 12)
    cfg = FilterPruneConfig(ratio=0.5, exclude=("layer3.*",), min_channels=6)
    chosen = plan_filters(model, cfg, x)
    g = build_dependency_graph(model, x)
    for grp in g.groups:
        removed = len(chosen.removed.get(grp.index, []))
        if any(p.startswith("layer3.") for p in grp.producers) or not grp.num_prunable:
            assert removed == 0
        else:
            assert removed == min(grp.size // 2, grp.size - 6)


def test_global_scope_removes_ratio_of_all_channels():
    model = ResNet18ish()
    x = torch.randn(1, 3, 16, 16)
    g = build_dependency_graph(model, x)
    total = sum(grp.num_prunable for grp in g.groups)
    chosen = plan_filters(model, FilterPruneConfig(ratio=0.3, scope="global"), x)
    assert sum(len(v) for v in chosen.removed.values()) == int(0.3 * total)


def test_per_layer_ratios():
    model = ResNet18ish()
    x = torch.randn(1, 3, 16, 16)
    cfg = FilterPruneConfig(per_layer={"layer1.0.conv1": 0.5, "layer2.0.conv1": 0.25})
    report = prune_filters_(model, cfg, x)
    assert model.layer1[0].conv1.out_channels == 4 and model.layer2[0].conv1.out_channels == 12
    assert model.layer1[1].conv1.out_channels == 8
    assert report.params_after < report.params_before
    with pytest.raises(ConfigError, match=r"per_layer key 'nope'"):
        plan_filters(ResNet18ish(), FilterPruneConfig(per_layer={"nope": 0.5}), x)
    with pytest.raises(ConfigError, match="differs"):
        plan_filters(
            ResNet18ish(),
            FilterPruneConfig(per_layer={"layer2.0.conv2": 0.5, "layer2.1.conv2": 0.25}),
            x,
        )
    with pytest.raises(ConfigError, match="cannot be removed"):
        plan_filters(ResNet18ish(), FilterPruneConfig(per_layer={"fc": 0.5}), x)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_macs_budget_is_met_and_tight(scope):
    model = create("resnet-20", width=8)
    x = torch.randn(1, 1, 16, 16)
    before = sum(v[0] for v in count_macs(model, (1, 16, 16)).values())
    report = prune_filters_(model, FilterPruneConfig(macs_budget=0.6, scope=scope), x)
    after = sum(v[0] for v in count_macs(model, (1, 16, 16)).values())
    assert report.macs_before == before and report.macs_after == after
    assert after <= 0.6 * before
    assert after >= 0.5 * before  # bisection finds the smallest ratio, not an overshoot
    assert model(x).shape == (1, 10)


def test_macs_budget_unreachable_is_reported():
    with pytest.raises(ConfigError, match=r"macs_budget=0.05: unreachable"):
        plan_filters(
            create("resnet-20", width=8),
            FilterPruneConfig(macs_budget=0.05, exclude=("*.conv2", "*shortcut*", "conv1")),
            torch.randn(1, 1, 12, 12),
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.2}, r"ratio=1.2: must be in \[0, 1\)"),
        ({"ratio": 0.5, "macs_budget": 0.5}, "exactly one"),
        ({}, "exactly one"),
        ({"macs_budget": 0.0}, r"macs_budget=0.0: must be in \(0, 1\]"),
        ({"ratio": 0.5, "criterion": "l3"}, "criterion='l3'"),
        ({"ratio": 0.5, "scope": "net"}, "scope='net'"),
        ({"ratio": 0.5, "min_channels": 0}, "min_channels=0"),
        ({"per_layer": {"fc1": 1.5}}, r"per_layer\['fc1'\]=1.5: must be in \[0, 1\)"),
        ({"per_layer": {"fc1": 0.5}, "scope": "global"}, "scope='global'"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FilterPruneConfig(**kwargs)


def test_config_round_trips_through_dict():
    from nncompress.engine import config_from_dict, config_to_dict

    cfg = FilterPruneConfig("l2", per_layer={"a": 0.5}, exclude=["x*"])
    assert cfg.exclude == ("x*",)
    assert config_from_dict(FilterPruneConfig, config_to_dict(cfg)) == cfg


def test_other_architectures_prune_and_run():
    for model, x in (
        (InceptionNet(), torch.randn(2, 3, 8, 8)),
        (TinyTransformerMLP(), torch.randn(2, 5, 8)),
    ):
        report = prune_filters_(model, FilterPruneConfig(ratio=0.5), x)
        assert report.macs_after < report.macs_before
        assert model(x).shape[0] == 2
    assert model.blocks[0].fc1.out_features == 8 and model.blocks[0].fc2.in_features == 8


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)  # (B, 32, 4, 4)
        return self.fc(torch.flatten(x, 1))


def test_l1_beats_largest_and_retraining_recovers(digits_data):
    torch.manual_seed(0)
    base = _SmallCNN()
    fit(base, digits_data.loader("train", 64, seed=0), TrainConfig(epochs=4, lr=0.05))
    test = digits_data.loader("test", 256)
    acc0 = evaluate(base, test)["accuracy"]
    assert acc0 > 85
    x = torch.randn(1, 1, 8, 8)
    accs = {}
    models = {}
    for crit in ("l1", "largest"):
        m = _SmallCNN()
        m.load_state_dict(base.state_dict())
        prune_filters_(m, FilterPruneConfig(crit, ratio=0.5), x)
        accs[crit] = evaluate(m, test)["accuracy"]
        models[crit] = m
    assert models["l1"].conv2.out_channels == 16 and models["l1"].fc.in_features == 16 * 16
    assert accs["l1"] > accs["largest"]
    finetune(
        models["l1"], digits_data.loader("train", 64, seed=1), TrainConfig(epochs=3), lr_scale=0.4
    )
    assert evaluate(models["l1"], test)["accuracy"] >= max(acc0 - 2, accs["l1"] + 5)


def _tiny_resnet_checkpoint(path, splits):
    from nncompress.engine import save_checkpoint

    kwargs = {"width": 4, "in_channels": 1, "num_classes": splits.num_classes}
    torch.manual_seed(0)
    model = create("resnet-20", **kwargs)
    return save_checkpoint(
        model, path, model_name="resnet-20", model_kwargs=kwargs, dataset=splits.describe()
    )


def test_stage_prunes_retrains_and_reports(digits_data, tmp_path):
    from nncompress.stages.base import StageContext
    from nncompress.stages.filter_prune import FilterPruneStageConfig, run_filter_prune_stage

    model = create("resnet-20", width=4, in_channels=1, num_classes=digits_data.num_classes)
    ctx = StageContext(
        model=model,
        splits=digits_data,
        model_name="resnet-20",
        model_kwargs={},
        train_config=TrainConfig(epochs=1, batch_size=128),
        out_dir=tmp_path,
    )
    cfg = FilterPruneStageConfig(macs_budget=0.7, exclude=["conv1", "*.conv2"], epochs=1)
    assert cfg.exclude == ("conv1", "*.conv2")
    report = run_filter_prune_stage(ctx, cfg)
    assert report["macs_after"] <= 0.7 * report["macs_before"]
    assert report["retrain"]["epochs"] == 1
    assert 0 <= report["test_accuracy"] <= 100 and 0 <= report["test_accuracy_pruned"] <= 100
    assert model.layer1[0].conv1.out_channels < 4 and model.layer1[0].conv2.out_channels == 4
    with pytest.raises(ConfigError, match="epochs=-1"):
        FilterPruneStageConfig(ratio=0.5, epochs=-1)
    with pytest.raises(ConfigError, match="exactly one"):
        FilterPruneStageConfig()


def test_cli_prune_filter_method(digits_data, tmp_path, capsys):
    from nncompress.cli import main
    from nncompress.engine import load_checkpoint

    ckpt = _tiny_resnet_checkpoint(tmp_path / "r.safetensors", digits_data)
    out_path = tmp_path / "thin.safetensors"
    rc = main(
        ["prune", str(ckpt), "--method", "filter-l1", "--ratio", "0.5", "--quiet",
         "--exclude", "conv1", "*.conv2", "*.shortcut.*", "--out", str(out_path)]
    )  # fmt: skip
    assert rc == 0
    assert "physically" in capsys.readouterr().out
    model, side = load_checkpoint(out_path)
    assert model.layer2[1].conv1.out_channels == 4 and model.layer2[1].conv2.out_channels == 8
    assert side["metrics"]["test_accuracy"] is not None
    rc = main(
        ["prune", str(ckpt), "--method", "filter-l1", "--ratio", "1.5", "--out", str(out_path)]
    )
    assert rc == 2 and "ratio=1.5: must be in [0, 1)" in capsys.readouterr().err


def test_cli_prune_filters_command_matches_prune_method(digits_data, tmp_path, capsys):
    import json

    from nncompress.cli import main
    from nncompress.engine import load_checkpoint

    ckpt = _tiny_resnet_checkpoint(tmp_path / "r.safetensors", digits_data)
    flags = ["--ratio", "0.5", "--quiet", "--json", "--exclude", "conv1", "*.conv2"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["prune-filters", str(ckpt), "--criterion", "l2", *flags, "--out", str(a)]) == 0
    rep_a = json.loads(capsys.readouterr().out)
    assert main(["prune", str(ckpt), "--method", "filter-l2", *flags, "--out", str(b)]) == 0
    rep_b = json.loads(capsys.readouterr().out)
    assert rep_a["plan"] == rep_b["plan"] and rep_a["macs_after"] < rep_a["macs_before"]
    ma, mb = load_checkpoint(a)[0], load_checkpoint(b)[0]
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    # connection-pruning flags do not exist on prune-filters
    with pytest.raises(SystemExit):
        main(["prune-filters", str(ckpt), "--ratio", "0.5", "--sparsity", "0.5", "--out", str(a)])
