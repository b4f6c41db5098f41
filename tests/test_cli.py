"""CLI smoke tests through the real entry point (``python -m nncompress.cli``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from nncompress.cli import build_parser, main

BASIC = ["models", "train", "eval", "stats", "demo"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    res = subprocess.run(
        [sys.executable, "-m", "nncompress.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    if check:
        assert res.returncode == 0, res.stderr
    return res


def _err(capsys) -> str:
    """Captured stderr with rich's line wrapping undone."""
    return capsys.readouterr().err.replace("\n", "")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits-mlp.safetensors"
    res = run_cli(
        "train",
        "--model", "lenet-300-100",
        "--dataset", "digits",
        "--epochs", "2",
        "--grad-clip", "5",
        "--label-smoothing", "0.05",
        "--early-stopping", "3",
        "--restore-best",
        "--quiet",
        "--out", str(out),
    )  # fmt: skip
    assert "test accuracy" in res.stdout
    return out


def test_models_json(capsys):
    # in-process (tests/test_smoke.py runs 'models --json' through a subprocess already)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["name"]: r for r in rows}
    assert by["lenet-300-100"]["params"] == 266_610
    assert by["lenet-5"]["params"] == 431_080
    assert {"resnet-20", "resnet-56", "vgg-small"} <= set(by)


def test_train_writes_checkpoint_with_recipe(trained):
    side = json.loads(trained.with_suffix(".json").read_text())
    assert side["architecture"]["model"] == "lenet-300-100"
    assert side["architecture"]["kwargs"] == {"num_classes": 10, "in_features": 64}
    assert side["dataset"]["name"] == "digits"
    recipe = side["extra"]["train_config"]
    assert recipe["epochs"] == 2 and recipe["grad_clip"] == 5.0
    assert recipe["label_smoothing"] == 0.05 and recipe["early_stopping"] == 3
    assert recipe["restore_best"] is True
    assert len(side["history"]) == 2 and "val_loss" in side["history"][0]
    assert side["metrics"]["test_accuracy"] > 50


def test_eval_json(trained):
    res = json.loads(run_cli("eval", str(trained), "--json", "--quiet").stdout)
    side = json.loads(trained.with_suffix(".json").read_text())
    assert res["split"] == "test" and res["samples"] == 449
    assert res["accuracy"] == pytest.approx(side["metrics"]["test_accuracy"])
    assert res["loss"] == pytest.approx(side["metrics"]["test_loss"], rel=1e-5)


def test_stats_json(trained):
    d = json.loads(
        run_cli("stats", str(trained), "--json", "--batches", "1,8", "--repeats", "3").stdout
    )
    for key in ("params", "nonzeros", "macs", "bytes_fp32", "layers", "latency_ms"):
        assert key in d
    params = 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert d["params"] == params and d["bytes_fp32"] == 4 * params
    assert d["macs"] == 64 * 300 + 300 * 100 + 100 * 10
    assert [layer["name"] for layer in d["layers"]] == ["fc1", "fc2", "fc3"]
    assert set(d["latency_ms"]) == {"batch_1", "batch_8"}


def test_stats_table(trained, capsys):
    assert main(["stats", str(trained), "--batches", ""]) == 0
    text = capsys.readouterr().out
    assert "fc1" in text and "dense fp32 bytes" in text and "latency" not in text


def test_bad_option_value_exits_2_naming_it(tmp_path, capsys):
    code = main(
        ["train", "--model", "lenet-300-100", "--dataset", "digits", "--epochs", "-1",
         "--out", str(tmp_path / "x.safetensors")]
    )  # fmt: skip
    assert code == 2 and "epochs=-1" in _err(capsys)
    res = run_cli(
        "train", "--model", "lenet-300-100", "--optimizer", "rmsprop",
        "--out", str(tmp_path / "x.safetensors"), check=False,
    )  # fmt: skip
    assert res.returncode == 2 and "--optimizer" in res.stderr and "rmsprop" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_tampered_checkpoint_exits_2(trained, tmp_path, capsys):
    copy = tmp_path / "t.safetensors"
    copy.write_bytes(trained.read_bytes())
    side = json.loads(trained.with_suffix(".json").read_text())
    side["metrics"]["test_accuracy"] = 100.0
    copy.with_suffix(".json").write_text(json.dumps(side))
    assert main(["eval", str(copy), "--quiet"]) == 2
    assert "does not match" in _err(capsys)


# In-process checks of the parser (fast: no interpreter start per command).


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in BASIC:
        assert cmd in text


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_command_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("command", BASIC)
def test_basic_commands_explain_every_option(command):
    sub = _subcommands()[command]
    assert sub.description, f"'{command}' has no description"
    for action in sub._actions:
        assert action.help and action.help.strip(), f"{command}: {action.dest} has no help"


def test_train_help_lists_new_options():
    text = _subcommands()["train"].format_help()
    opts = ("--early-stopping", "--restore-best", "--label-smoothing", "--grad-clip", "--l1")
    for opt in (*opts, "--augment"):
        assert opt in text


def test_missing_data_folder_exits_2_with_hint(tmp_path, capsys):
    code = main(
        [
            "train", "--model", "lenet-5", "--dataset", "fashion-mnist",
            "--data-dir", str(tmp_path / "nowhere"), "--epochs", "1",
            "--out", str(tmp_path / "m.safetensors"),
        ]
    )  # fmt: skip
    err = _err(capsys)
    assert code == 2 and "nowhere" in err and "dataset-fashion-mnist" in err


def test_out_must_be_safetensors(tmp_path, capsys):
    # rejected by the parser, before any data is loaded or trained
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--model",
                "lenet-5",
                "--dataset",
                "synthetic",
                "--out",
                str(tmp_path / "m.pt"),
            ]
        )
    err = _err(capsys)
    assert exc.value.code == 2 and "--out" in err and "must end in .safetensors" in err
