"""A catalogue of bad recipes and bad command lines (issue 19).

Every case must: exit with code 2; print exactly one line naming the field or option and the
values allowed; print no traceback; write no file; and fail before any training (the training
loop and the dataset loaders are replaced by tripwires). The cases run in-process through
``nncompress.cli.main`` (a handful also through the real ``python -m nncompress`` entry point).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nncompress.cli import main
from nncompress.engine import save_checkpoint
from nncompress.io import save_compressed
from nncompress.models import create

VALID = """\
model: lenet-300-100
data: synthetic
train: {epochs: 1, lr: 0.05}
stages:
  - {stage: train}
  - {stage: prune, sparsity: 0.5}
  - {stage: share, bits_fc: 4}
  - {stage: finetune, epochs: 1}
  - {stage: encode}
"""


def _recipe(**replace: str) -> str:
    """VALID with whole lines replaced: ``train="train: {...}"`` etc."""
    lines = VALID.splitlines()
    for key, new in replace.items():
        idx = [i for i, ln in enumerate(lines) if ln.startswith(key.replace("_", " ") + ":")]
        lines[idx[0]] = new
    return "\n".join(lines) + "\n"


def _stages(*items: str) -> str:
    head = VALID.split("stages:")[0]
    return head + "stages:\n" + "".join(f"  - {s}\n" for s in items)


LAUGHS = textwrap.dedent(
    """\
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    """
)

# (recipe text, substrings the one error line must hold: the field and what is allowed)
BAD_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lr inf": (_recipe(train="train: {epochs: 1, lr: .inf}"), ("train.lr", "finite")),
    "lr 1e400": (_recipe(train="train: {epochs: 1, lr: 1e400}"), ("train.lr", "finite")),
    "lr 1.0e+400": (_recipe(train="train: {epochs: 1, lr: 1.0e+400}"), ("train.lr", "finite")),
    "lr negative": (_recipe(train="train: {lr: -1}"), ("lr=-1", "(0, 100.0]")),
    "lr huge": (_recipe(train="train: {lr: 1e9}"), ("lr=1000000000.0", "(0, 100.0]")),
    "lr string": (_recipe(train="train: {lr: fast}"), ("lr='fast'", "a finite number")),
    "epochs float": (_recipe(train="train: {epochs: 1.5}"), ("epochs=1.5", "an integer")),
    "epochs bool": (_recipe(train="train: {epochs: true}"), ("epochs=True", "an integer")),
    "epochs 1e26": (_recipe(train="train: {epochs: 1e26}"), ("epochs=1e+26", "an integer")),
    "epochs huge int": (
        _recipe(train="train: {epochs: 100000000000000000000000000}"),
        ("epochs=", "[0, 100000]"),
    ),
    "momentum": (_recipe(train="train: {momentum: 1.5}"), ("momentum=1.5", "[0, 1)")),
    "batch size": (_recipe(train="train: {batch_size: 0}"), ("batch_size=0", "[1, 1048576]")),
    "optimizer": (_recipe(train="train: {optimizer: rmsprop}"), ("optimizer='rmsprop'", "sgd")),
    "schedule": (_recipe(train="train: {schedule: linear}"), ("schedule='linear'", "cosine")),
    "train unknown": (_recipe(train="train: {bogus: 1}"), ("['bogus']", "allowed")),
    "seed": (_recipe(train="train: {seed: -1}"), ("seed=-1", "[0, 2**63)")),
    "label smoothing": (
        _recipe(train="train: {label_smoothing: 1}"),
        ("label_smoothing", "[0, 1)"),
    ),
    "grad clip": (_recipe(train="train: {grad_clip: 0}"), ("grad_clip=0", "> 0 or null")),
    "warmup inf": (
        _recipe(train="train: {warmup_epochs: .inf}"),
        ("train.warmup_epochs", "finite"),
    ),
    "switch epoch": (
        _recipe(train="train: {regularization_switch_epoch: -1}"),
        ("regularization_switch_epoch=-1", ">= 0 or null"),
    ),
    "duplicate key": (_recipe(train="train: {epochs: 1, epochs: 2}"), ("duplicate key 'epochs'",)),
    "billion laughs description": (
        LAUGHS + _recipe().replace("model:", "description: *c\nmodel:"),
        ("anchors and aliases", "not allowed"),
    ),
    "alias in model kwargs": (
        "k: &k {dropout: 0.1}\n"
        + _recipe(model="model: {name: lenet-300-100, kwargs: *k}").replace("k: &k", "x: &k"),
        ("anchors and aliases",),
    ),
    "alias in stages": (
        _stages("&t {stage: train}", "*t"),
        ("anchors and aliases",),
    ),
    "deep nesting": (
        _recipe(train="train: " + "[" * 40 + "]" * 40),
        ("nested more than 32",),
    ),
    "not yaml": (_recipe(train="train: {epochs: 1"), ("not valid YAML",)),
    "top level list": ("- 1\n- 2\n", ("top level must be a mapping",)),
    "model unknown": (_recipe(model="model: alexnet"), ("model='alexnet'", "lenet-300-100")),
    "model kwarg unknown": (
        _recipe(model="model: {name: lenet-300-100, kwargs: {hidden: 5}}"),
        ("['hidden']", "allowed"),
    ),
    "model kwarg range": (
        _recipe(model="model: {name: lenet-300-100, kwargs: {num_classes: 0}}"),
        ("num_classes=0", "[1, 1048576]"),
    ),
    "model kwarg vs dataset": (
        _recipe(model="model: {name: lenet-300-100, kwargs: {in_features: 100}}"),
        ("model.kwargs.in_features=100", "needs 64"),
    ),
    "model dropout": (
        _recipe(model="model: {name: lenet-300-100, kwargs: {dropout: 2}}"),
        ("dropout=2", "[0.0, 1.0]"),
    ),
    "data unknown option": (
        _recipe(data="data: {name: synthetic, bogus: 1}"),
        ("['bogus']", "allowed"),
    ),
    "data option range": (_recipe(data="data: {name: synthetic, n: 0}"), ("data.n=0", "[8,")),
    "data unknown": (_recipe(data="data: imagenet"), ("data='imagenet'", "fashion-mnist")),
    "data folder missing": (
        _recipe(data="data: {name: fashion-mnist, data_dir: /nonexistent/fm}"),
        ("/nonexistent/fm", "does not exist"),
    ),
    "no model": (_stages("{stage: train}").replace("model: lenet-300-100\n", ""), ("give",)),
    "baseline missing": (
        _recipe(model="baseline: missing.safetensors"),
        ("baseline='missing.safetensors'", "does not exist"),
    ),
    "top-level unknown": (_recipe() + "extras: 1\n", ("['extras']", "allowed")),
    "stages empty": (_recipe().split("stages:")[0] + "stages: []\n", ("stages=[]", "non-empty")),
    "stage unknown": (_stages("{stage: nope}"), ("stage='nope'", "must be one of")),
    "stage without name": (_stages("{epochs: 1}"), ("stages[0]", "'stage' name")),
    "prune sparsity": (_stages("{stage: prune, sparsity: 1.5}"), ("sparsity=1.5", "[0, 1)")),
    "prune sparsity nan": (_stages("{stage: prune, sparsity: .nan}"), ("sparsity", "finite")),
    "prune agp no epochs": (
        _stages("{stage: prune, method: agp, sparsity: 0.5}"),
        ("epochs=0", "needs epochs >= 1"),
    ),
    "prune unknown field": (_stages("{stage: prune, sparsity: 0.5, bogus: 1}"), ("['bogus']",)),
    "prune iterations float": (
        _stages("{stage: prune, sparsity: 0.5, iterations: 2.5}"),
        ("iterations=2.5", "an integer"),
    ),
    "prune exclude matches nothing": (
        _stages("{stage: prune, sparsity: 0.5, exclude: [nope]}"),
        ("exclude=['nope']", "matches no layer", "fc1"),
    ),
    "prune per_layer matches nothing": (
        _stages("{stage: prune, sparsity: 0.5, per_layer: {fc9: 0.5}}"),
        ("per_layer=['fc9']", "matches no layer"),
    ),
    "prune agp option with magnitude": (
        _stages("{stage: prune, sparsity: 0.5, agp_frequency: 5}"),
        ("agp_frequency=5: does not apply here", "method='agp'"),
    ),
    "prune max_drop without allocation": (
        _stages("{stage: prune, sparsity: 0.5, max_drop: 1}"),
        ("max_drop=1: does not apply here", "allocate='sensitivity'"),
    ),
    "quantize qat epochs with ptq": (
        _stages("{stage: quantize, qat_epochs: 3}"),
        ("qat_epochs=3: does not apply here", "method='qat'"),
    ),
    "share before prune": (
        _stages("{stage: share, bits_fc: 4}", "{stage: prune, sparsity: 0.5}"),
        ("stages[1] (prune): must come before stages[0] (share)",),
    ),
    "encode not last": (
        _stages("{stage: encode}", "{stage: train}"),
        ("(encode): must be the last stage",),
    ),
    "encode codec": (_stages("{stage: encode, codec: zip}"), ("codec='zip'", "huffman")),
    "finetune lr_scale": (
        _stages("{stage: finetune, lr_scale: 0}"),
        ("lr_scale=0", "(0, 100]"),
    ),
    "finetune epochs": (_stages("{stage: finetune, epochs: -1}"), ("epochs=-1", "[0, 100000]")),
    "stage lr inf": (_stages("{stage: train, lr: .inf}"), ("stages[0].lr", "finite")),
    "decompose layers": (
        _stages("{stage: decompose, method: svd, rank: 4, layers: [nope]}"),
        ("layers=['nope']", "matches no layer"),
    ),
    "quick epochs": (_recipe() + "quick: {epochs: 0}\n", ("quick.epochs=0", "[1, 1000]")),
    "name list": (_recipe() + "name: [1]\n", ("name=[1]", "a string")),
    "description map": (_recipe() + "description: {a: 1}\n", ("description=", "a string")),
}


@pytest.fixture
def tripwires(monkeypatch):
    """Training and dataset loading fail the test: every refusal must come before them."""
    import nncompress.data as data
    import nncompress.data.datasets as datasets
    import nncompress.engine.train as train

    def boom(*a, **k):
        raise AssertionError("training or data loading started before the refusal")

    monkeypatch.setattr(train, "_train_epoch", boom)
    for module in (data, datasets):
        monkeypatch.setattr(module, "load_dataset", boom)
    monkeypatch.setattr(datasets, "_finish", boom)  # every loader ends there
    monkeypatch.setattr(datasets, "read_idx", boom)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def run_bad(argv: list[str], capsys, watch: Path) -> str:
    """Run ``argv``; check exit code 2, no new file under ``watch``, no traceback, one line."""
    before = _files(watch)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.err)
    assert "Traceback" not in cap.err + cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("error:"), lines[0]
    assert _files(watch) == before, _files(watch) - before
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe(case, tmp_path, capsys, tripwires):
    text, expected = BAD_RECIPES[case]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    line = run_bad(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"], capsys, tmp_path)
    for e in expected:
        assert e in line, (e, line)
    # --check finds the same error
    assert run_bad(["run", str(path), "--out", str(tmp_path / "o2"), "--check"], capsys, tmp_path)


def test_catalogue_sizes():
    assert len(BAD_RECIPES) >= 40 and len(BAD_CLI) >= 40


def test_valid_recipe_passes_check(tmp_path, capsys, tripwires):
    path = tmp_path / "recipe.yaml"
    path.write_text(VALID)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--check"]) == 0
    assert "valid (5 stages)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ bad command lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A LeNet-300-100 checkpoint of the synthetic dataset (8x8 inputs, 4 classes), its
    ``.ncz``, a damaged ``.ncz``, a recipe, a plain file and a folder named like outputs."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = create("lenet-300-100", in_features=64, num_classes=4)
    ds = {"name": "synthetic", "num_classes": 4, "input_shape": [1, 8, 8]}
    ckpt = save_checkpoint(
        model, root / "m.safetensors", model_name="lenet-300-100",
        model_kwargs={"in_features": 64, "num_classes": 4}, dataset=ds,
    )  # fmt: skip
    from nncompress.engine import read_sidecar
    from nncompress.io import checkpoint_metadata

    ncz = root / "m.ncz"
    save_compressed(model, ncz, metadata=checkpoint_metadata(read_sidecar(ckpt)))
    bad = root / "bad.ncz"
    bad.write_bytes(ncz.read_bytes()[:-5])
    recipe = root / "r.yaml"
    recipe.write_text(VALID)
    plain = root / "plain.txt"
    plain.write_text("x")
    (root / "dir.safetensors").mkdir()
    (root / "dir.ncz").mkdir()
    return {
        "ckpt": str(ckpt), "ncz": str(ncz), "bad": str(bad), "recipe": str(recipe),
        "plain": str(plain), "root": root,
    }  # fmt: skip


def _o(name: str = "o.safetensors") -> str:
    return f"{{out}}/{name}"


T = ["train", "--model", "lenet-300-100", "--dataset", "synthetic", "--out", _o()]
P = ["prune", "{ckpt}", "--out", _o()]
D = ["decompose", "{ckpt}", "--out", _o()]
Q = ["quantize", "{ckpt}"]

# (argv with {ckpt} {ncz} {bad} {recipe} {plain} {root} {out} placeholders, substrings)
BAD_CLI: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "train lr inf": ([*T, "--lr", "inf"], ("--lr=inf", "finite")),
    "train lr nan": ([*T, "--lr", "nan"], ("--lr=nan", "finite")),
    "train lr negative": ([*T, "--lr", "-1"], ("lr=-1.0", "(0, 100.0]")),
    "train epochs negative": ([*T, "--epochs", "-1"], ("epochs=-1", "[0, 100000]")),
    "train epochs float": ([*T, "--epochs", "1.5"], ("--epochs", "invalid int value")),
    "train batch size": ([*T, "--batch-size", "0"], ("batch_size=0", "[1, 1048576]")),
    "train model": (
        ["train", "--model", "alexnet", "--out", _o()],
        ("--model='alexnet'", "lenet-5"),
    ),
    "train dataset": ([*T, "--dataset", "imagenet"], ("--dataset", "choose from")),
    "train label smoothing": ([*T, "--label-smoothing", "1"], ("label_smoothing=1.0", "[0, 1)")),
    "train grad clip": ([*T, "--grad-clip", "0"], ("grad_clip=0.0", "> 0 or null")),
    "train out suffix": (["train", "--model", "lenet-5", "--out", _o("m.pt")], (".safetensors",)),
    "train out is a folder": (
        ["train", "--model", "lenet-5", "--out", "{root}/dir.safetensors"],
        ("--out=", "is a folder; give a file name"),
    ),
    "train out below a file": (
        ["train", "--model", "lenet-5", "--out", "{plain}/sub/m.safetensors"],
        ("--out=", "is a file, so", "cannot be created"),
    ),
    "train out read-only": (
        ["train", "--model", "lenet-5", "--out", "/sys/m.safetensors"],
        ("--out=", "cannot write into folder '/sys'"),
    ),
    "prune ratio with magnitude": ([*P, "--ratio", "2"], ("--ratio=2.0", "--method filter-*")),
    "prune sparsity range": ([*P, "--sparsity", "1.5"], ("sparsity=1.5", "[0, 1)")),
    "prune method": ([*P, "--method", "nope"], ("--method='nope'", "magnitude")),
    "prune agp option": ([*P, "--q", "1", "--agp-frequency", "5"], ("--agp-frequency=5", "agp")),
    "prune max-drop": ([*P, "--q", "1", "--max-drop", "1"], ("--max-drop=1.0", "--allocate-sens")),
    "prune lr-scale no retrain": (
        [*P, "--q", "1", "--lr-scale", "0.5"],
        ("--lr-scale=0.5", "--retrain-epochs > 0"),
    ),
    "prune exclude nothing": (
        [*P, "--sparsity", "0.5", "--exclude", "nope"],
        ("exclude=['nope']", "matches no layer", "fc1"),
    ),
    "prune per-layer nothing": (
        [*P, "--sparsity", "0.5", "--per-layer", "fc9=0.5"],
        ("per_layer=['fc9']", "matches no layer"),
    ),
    "prune filter with sparsity": (
        [*P, "--method", "filter-l1", "--sparsity", "0.5"],
        ("--sparsity=0.5", "--ratio or --macs-budget"),
    ),
    "prune l1-then-l2 without l1": (
        [*P, "--q", "1", "--retrain-epochs", "1", "--l1-then-l2", "2"],
        ("--l1-then-l2=2", "only with --l1"),
    ),
    "prune-filters ratio": (
        ["prune-filters", "{ckpt}", "--ratio", "1.5", "--out", _o()],
        ("ratio=1.5", "[0, 1)"),
    ),
    "prune-filters lr no retrain": (
        ["prune-filters", "{ckpt}", "--ratio", "0.5", "--lr-scale", "0.5", "--out", _o()],
        ("--lr-scale=0.5", "--retrain-epochs > 0"),
    ),
    "decompose layers nothing": (
        [*D, "--method", "svd", "--rank", "2", "--layers", "nope"],
        ("layers=['nope']", "matches no layer"),
    ),
    "decompose tt-cores": (
        [*D, "--method", "svd", "--rank", "2", "--tt-cores", "4"],
        ("--tt-cores=4", "--method tt"),
    ),
    "decompose lr no finetune": (
        [*D, "--method", "svd", "--rank", "2", "--lr", "0.1"],
        ("--lr=0.1", "--finetune-epochs > 0"),
    ),
    "decompose method": ([*D, "--method", "nope", "--rank", "2"], ("method='nope'", "svd")),
    "quantize qat epochs with ptq": (
        [*Q, "--method", "ptq", "--qat-epochs", "3", "--out", _o("q.onnx")],
        ("--qat-epochs=3", "--method qat"),
    ),
    "quantize ptq out suffix": ([*Q, "--out", _o("q.ncz")], ("--out=", ".onnx")),
    "quantize pq with weights": (
        [*Q, "--method", "pq", "--weights", "int4", "--out", _o("q.ncz")],
        ("--weights=int4", "ptq or qat"),
    ),
    "quantize observer no activations": (
        [*Q, "--activations", "none", "--observer", "kl", "--out", _o("q.onnx")],
        ("--observer=kl", "--activations none"),
    ),
    "encode index bits with auto": (
        ["encode", "{ckpt}", "--auto-index-bits", "--index-bits-fc", "6", "--out", _o("e.ncz")],
        ("--index-bits-fc=6", "--auto-index-bits"),
    ),
    "encode out suffix": (["encode", "{ckpt}", "--out", _o("e.zip")], ("--out=", ".ncz")),
    "encode out folder": (["encode", "{ckpt}", "--out", "{root}/dir.ncz"], ("is a folder",)),
    "encode codec": (
        ["encode", "{ckpt}", "--codec", "zip", "--out", _o("e.ncz")],
        ("--codec", "choose from"),
    ),
    "decode out suffix": (["decode", "{ncz}", "--out", _o("d.pt")], (".safetensors",)),
    "decode max-bytes zero": (
        ["decode", "{ncz}", "--max-bytes", "0", "--out", _o()],
        ("--max-bytes", "byte count >= 1"),
    ),
    "decode max-bytes small": (
        ["decode", "{ncz}", "--max-bytes", "1000", "--out", _o()],
        ("max_bytes=1000", "raise max_bytes"),
    ),
    "inspect damaged": (["inspect", "{bad}"], ("bad.ncz", "truncated")),
    "eval missing": (["eval", "{root}/none.safetensors"], ("none.safetensors", "does not exist")),
    "stats repeats without batches": (
        ["stats", "{ckpt}", "--batches", "", "--repeats", "5"],
        ("--repeats=5", "--batches"),
    ),
    "stats batches": (["stats", "{ckpt}", "--batches", "0"], ("--batches='0'", ">= 1")),
    "distill alpha label-free": (
        [
            "distill",
            "{ckpt}",
            "--student",
            "lenet-5",
            "--label-free",
            "--alpha",
            "0.5",
            "--out",
            _o(),
        ],  # fmt: skip
        ("--alpha=0.5", "--label-free"),
    ),
    "distill temperature": (
        ["distill", "{ckpt}", "--student", "lenet-5", "--temperature", "0", "--out", _o()],
        ("temperature=0", "> 0"),
    ),
    "run out is a file": (["run", "{recipe}", "--out", "{plain}"], ("is a file; give a folder",)),
    "sensitivity exclude": (
        ["sensitivity", "{ckpt}", "--exclude", "nope", "--out", "{out}/s"],
        ("--exclude=['nope']", "matches no layer"),
    ),
    "sensitivity grid": (
        ["sensitivity", "{ckpt}", "--sparsities", "0,2", "--out", "{out}/s"],
        ("--sparsities='0,2'", "(0, 1)"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CLI))
def test_bad_cli(case, files, tmp_path, capsys, tripwires):
    argv, expected = BAD_CLI[case]
    subs = {k: str(v) for k, v in files.items()} | {"out": str(tmp_path)}
    argv = [a.format(**subs) for a in argv]
    before = _files(files["root"])
    line = run_bad(argv, capsys, tmp_path)
    assert _files(files["root"]) == before
    for e in expected:
        assert e.format(**subs) in line, (e, line)


def test_hostile_checkpoint_on_the_command_line(files, tmp_path, capsys, tripwires):
    """A checkpoint whose sidecar is damaged: one line, exit 2 (CheckpointError)."""
    import shutil

    ckpt = tmp_path / "c.safetensors"
    shutil.copy(files["ckpt"], ckpt)
    shutil.copy(Path(files["ckpt"]).with_suffix(".json"), ckpt.with_suffix(".json"))
    ckpt.with_suffix(".json").write_text("{" * 10_000)
    line = run_bad(["eval", str(ckpt)], capsys, tmp_path)
    assert "not valid JSON" in line and "nested more than 200" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["train", "--model", "lenet-5", "--lr", "inf", "--out", "{out}/m.safetensors"],
            "--lr=inf",
        ),
        (["run", "{recipe}", "--out", "{out}/r", "--check"], "anchors and aliases"),
        (["decode", "{ncz}", "--out", "{root}/dir.safetensors"], "is a folder"),
    ],
)
def test_real_entry_point(argv, expected, files, tmp_path):
    """The same guarantees through ``python -m nncompress.cli`` (its own process)."""
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(LAUGHS + VALID.replace("model:", "description: *c\nmodel:"))
    subs = {k: str(v) for k, v in files.items()} | {"out": str(tmp_path), "recipe": str(recipe)}
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "nncompress.cli", *[a.format(**subs) for a in argv]],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["laughs.yaml"]


# ------------------------------------------------------------------ every stage key, wrong types

# a valid mapping per stage (the stages not listed are valid with no key)
STAGE_BASE = {
    "prune": {"sparsity": 0.5},
    "filter_prune": {"ratio": 0.5},
    "decompose": {"method": "svd", "rank": 2},
    "early_exit": {"after": ["fc1"]},
}
WRONG = [[1], {"a": 1}, "x", 1.5, -1, True, None, 10**30, [[1]], float("nan")]


def test_every_stage_key_with_a_wrong_value_is_refused_by_name():
    """Every key of every registered stage, set to values of the wrong type or range, is
    refused with a ConfigError that names the key (a per-layer value names its layer): no
    "'int' object is not iterable"."""
    from nncompress.core.errors import ConfigError
    from nncompress.stages.registry import STAGES, stage_entry

    unnamed = []
    for name in STAGES:
        cls, _ = stage_entry(name)
        base = STAGE_BASE.get(name, {})
        cls.from_dict(base)
        for key in cls.keys():
            for v in WRONG:
                try:
                    cls.from_dict({**base, key: v})
                except ConfigError as exc:
                    if key not in str(exc) and "for layer" not in str(exc):
                        unnamed.append((name, key, v, str(exc)))
                except Exception as exc:  # noqa: BLE001 - what the test looks for
                    unnamed.append((name, key, v, f"{type(exc).__name__}: {exc}"))
    assert unnamed == []


# ------------------------------------------------------------------ every --out of every command

from nncompress.cli.common import DIR_OUTPUTS as DIR_OUT  # noqa: E402  (--out is a folder)

VALUES = {"--model": "lenet-5", "--student": "lenet-5", "--method": "svd", "--after": "fc1",
          "--target": "macs=0.5", "--rank": "2", "--ratio": "0.5"}  # fmt: skip
FOLDER_FOR = {"encode": "o.ncz", "quantize": "o.onnx", "cascade": "o.json"}


def _commands_with_out():
    import argparse

    from nncompress.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {n: p for n, p in sub.choices.items() if any(a.dest == "out" for a in p._actions)}


@pytest.mark.parametrize("command", sorted(_commands_with_out()))
def test_every_out_is_checked_before_any_work(command, files, tmp_path, capsys, tripwires):
    """Issue 19 item 6 ("13 of 13 were a traceback, usually after the work"): for every command
    with ``--out``, a folder where a file goes (or a file where a folder goes) is refused
    first, in one line naming --out."""
    parser = _commands_with_out()[command]
    positional = {"run": files["recipe"], "decode": files["ncz"]}.get(command, files["ckpt"])
    argv = [command]
    values = {**VALUES, "--calibration": str(files["plain"])}  # an existing file
    for a in parser._actions:
        if not a.option_strings and a.dest != "help":
            argv.append(positional)
        elif a.required and a.dest != "out":
            argv += [a.option_strings[0], values.get(a.option_strings[0], "1")]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            flag = group._group_actions[0].option_strings[0]
            argv += [flag, VALUES.get(flag, "1")]
    if command in DIR_OUT:
        out = files["plain"]
    else:
        out = tmp_path / FOLDER_FOR.get(command, "o.safetensors")
        out.mkdir()
    line = run_bad([*argv, "--out", str(out)], capsys, tmp_path)
    assert "--out=" in line and ("is a file" in line or "is a folder" in line), line
