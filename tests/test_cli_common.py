"""The shared parsing helpers of ``nncompress.cli.common`` (the copies they replaced in the
command modules printed exactly these messages)."""

from __future__ import annotations

import argparse

import pytest

from nncompress.cli import main
from nncompress.cli.common import name_value_pairs, number_list, path_with_suffix
from nncompress.core.errors import ConfigError


def test_path_with_suffix():
    check = path_with_suffix(".safetensors", ".ncz", what="a checkpoint or .ncz")
    assert str(check("a/b.ncz")) == "a/b.ncz"
    with pytest.raises(argparse.ArgumentTypeError, match="'b.pt' must end in a checkpoint or"):
        check("b.pt")
    with pytest.raises(argparse.ArgumentTypeError, match="must end in .json or .yaml"):
        path_with_suffix(".json", ".yaml")("x.txt")


def test_number_list():
    assert number_list("0.5, 1,,2", float, "bad") == (0.5, 1.0, 2.0)
    assert number_list("", int, "bad") == ()
    with pytest.raises(ConfigError, match="^bad$"):
        number_list("1,x", int, "bad")
    with pytest.raises(argparse.ArgumentTypeError, match="^nope$"):
        number_list("1.5", int, "nope", argparse.ArgumentTypeError)


def test_name_value_pairs():
    assert name_value_pairs(" fc1=0.9,fc2 = 3") == [("fc1", "0.9"), ("fc2", " 3")]
    assert name_value_pairs("fc1=0.9,fc2") is None


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["stats", "{ckpt}", "--batches", "1,x"], "--batches='1,x': must be comma-separated"),
        (["share", "{ckpt}", "--per-layer", "fc1=x", "--out", "{out}/s.ncz"], "NAME=BITS"),
        (["share", "{ckpt}", "--bits", "4", "--out", "{out}/s.pt"], "(compressed file)"),
        (["prune", "{ckpt}", "--per-layer", "fc1", "--out", "{out}/p.safetensors"], "name=value"),
        (["prune", "{ckpt}", "--per-layer", "fc1=x", "--out", "{out}/p.safetensors"], "'x'"),
        (["sensitivity", "{ckpt}", "--sparsities", "0.5,y", "--out", "{out}/s"], "comma-sep"),
    ],
)
def test_cli_messages_of_the_shared_parsers(argv, expected, tmp_path, capsys):
    import torch

    from nncompress.engine import save_checkpoint
    from nncompress.models import create

    torch.manual_seed(0)
    model = create("lenet-300-100", in_features=64, num_classes=4)
    ds = {"name": "synthetic", "num_classes": 4, "input_shape": [1, 8, 8]}
    ckpt = save_checkpoint(
        model, tmp_path / "m.safetensors", model_name="lenet-300-100",
        model_kwargs={"in_features": 64, "num_classes": 4}, dataset=ds,
    )  # fmt: skip
    argv = [a.format(ckpt=ckpt, out=tmp_path) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
