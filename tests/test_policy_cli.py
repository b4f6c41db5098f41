"""``nncompress search``, ``prune-filters --policy`` and the ``search`` recipe stage."""

from __future__ import annotations

import json

import pytest
import yaml

from nncompress.cli import main
from nncompress.core import ConfigError, Policy
from nncompress.engine import load_checkpoint
from nncompress.recipe import load_recipe, run_recipe
from nncompress.stats import count_macs


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy_cli")
    path = d / "base.safetensors"
    rc = main(
        [
            "train", "--model", "resnet-20", "--dataset", "digits", "--epochs", "1",
            "--out", str(path), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    return path


def _search(ckpt, out, *extra: str) -> int:
    return main(
        [
            "search", str(ckpt), "--target", "macs=0.5", "--agent", "random",
            "--val-samples", "100", "--out", str(out), "--quiet", *extra,
        ]
    )  # fmt: skip


def _macs(path) -> int:
    model, _ = load_checkpoint(path)
    return sum(v[0] for v in count_macs(model, (1, 8, 8)).values())


def test_cli_search_writes_policy_and_plots_resumes_and_prune_filters_applies_it(
    resnet_ckpt, tmp_path, capsys
):
    out = tmp_path / "search"
    assert _search(resnet_ckpt, out, "--episodes", "4", "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["episodes"] == 4 and rep["fractions"]["macs"] <= 0.5
    for name in ("policy.json", "rewards.png", "ratios.png", "episodes.jsonl", "search.json"):
        assert (out / name).is_file(), name
    pol = Policy.load(out / "policy.json")
    assert pol.filter and pol.info["agent"] == "random"
    # the same command with more episodes continues the search
    assert _search(resnet_ckpt, out, "--episodes", "6", "--json") == 0
    rep2 = json.loads(capsys.readouterr().out)
    assert rep2["resumed_episodes"] == 4 and rep2["episodes"] == 6
    # table output
    assert _search(resnet_ckpt, out, "--episodes", "6") == 0
    assert "per-layer ratios" in capsys.readouterr().out
    pruned = tmp_path / "pruned.safetensors"
    rc = main(
        [
            "prune-filters", str(resnet_ckpt), "--policy", str(out / "policy.json"),
            "--out", str(pruned), "--quiet", "--json",
        ]
    )  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    assert _macs(pruned) <= 0.5 * _macs(resnet_ckpt)


def test_cli_search_rejects_bad_input_before_any_episode(resnet_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert _search(resnet_ckpt, out, "--episodes", "2", "--target", "macs=0.01") == 2
    assert "budget macs=0.01: unreachable" in capsys.readouterr().err.replace("\n", "")
    assert not (out / "episodes.jsonl").exists()
    assert _search(resnet_ckpt, out, "--target", "flops=0.5") == 2
    assert "unknown metric 'flops'" in capsys.readouterr().err.replace("\n", "")
    rc = _search(resnet_ckpt, out, "--executor", "ray", "--ray-address", "127.0.0.1:9")
    assert rc == 2
    err = capsys.readouterr().err.replace("\n", "")
    try:
        import ray  # noqa: F401

        assert "no Ray head answers there" in err and "--executor local" in err
    except ImportError:
        assert "pip install 'nncompress[policy]'" in err and "--executor local" in err
    assert not (out / "episodes.jsonl").exists()
    assert _search(resnet_ckpt, out, "--ray-address", "auto") == 2
    assert "only applies to executor='ray'" in capsys.readouterr().err.replace("\n", "")


def test_recipe_search_then_filter_prune_with_the_policy(resnet_ckpt, tmp_path):
    recipe = {
        "name": "amc",
        "baseline": str(resnet_ckpt),
        "data": "digits",
        "stages": [
            {
                "stage": "search",
                "budgets": "macs=0.5",
                "agent": "random",
                "episodes": 2,
                "proxy": {"val_samples": 100, "calib_samples": 32},
            },
            {"stage": "filter_prune", "allocate": "policy", "epochs": 0},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = run_recipe(path, tmp_path / "run")
    search, prune = report["stages"][0], report["stages"][1]
    pol = Policy.load(tmp_path / "run" / "search" / "policy.json")
    assert search["report"]["policy"] == pol.to_dict()
    assert prune["report"]["macs_after"] <= 0.5 * prune["report"]["macs_before"]
    assert (tmp_path / "run" / "search" / "rewards.png").is_file()
    # allocate: policy without a search stage (or policy_file) is refused at load time
    bad = {**recipe, "stages": [recipe["stages"][1]]}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="needs a 'search' stage before it"):
        load_recipe(path)
    bad = {**recipe, "stages": [{"stage": "filter_prune", "allocate": "policy", "ratio": 0.3}]}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="the policy gives the per-layer ratios"):
        load_recipe(path)
