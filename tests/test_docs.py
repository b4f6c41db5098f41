"""Every fenced code block of README.md and docs/*.md runs as written (issue 13, point 7).

Rules (the failure message repeats them):

- Every block has a language. ``python`` blocks are executed, in order, in one namespace per
  page that starts with the names the pages' prose refers to (``model``, ``data`` /
  ``splits``, ``student``, ``teacher``, ``train_loader``, ``lenet5``, ``resnet20``, ... see
  :func:`_prelude`; ``model`` is the working folder's ``base.safetensors``); a python block
  whose first line is ``# NAME.py`` is that file's content and is written to the working folder
  instead. ``sh`` / ``bash`` blocks: every command is an ``nncompress`` command, run through
  the real command line (``nncompress.cli.main``) in a working folder shared by the page's
  blocks, holding ``base.safetensors`` / ``model.safetensors`` (a LeNet-5 checkpoint; a
  ResNet-20 on the pages of :data:`RESNET_PAGES`, whose snippets select ResNet layers),
  ``small.safetensors`` / ``lenet5.safetensors`` (LeNet-5), ``big.safetensors`` /
  ``resnet20.safetensors`` (ResNet-20), ``recipes/`` and the files of :data:`PAGE_FILES`;
  lines activating a virtual environment (``. .venv/bin/activate``) are skipped. ``yaml``
  blocks are recipes: a complete one (``model`` or ``baseline``) is run with ``--quick``, a
  fragment (``stages:`` only, or a list of stages) is validated as part of a recipe. ``text``
  blocks (layouts, command synopses, sample output) are not code.
- Tiny settings: ``NNCOMPRESS_MAX_SAMPLES=128`` (every dataset keeps its first 128 training
  samples: one batch per epoch), and policy searches run 6 episodes (3 of warm-up). Nothing
  else is rewritten.
- A block that cannot run here carries, on the line above it, the visible marker
  ``(Not run by the docs test: REASON)``; there are only a few.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "sh", "bash", "yaml"}
NOT_CODE = {"text"}
MARK = re.compile(r"^\s*\(Not run by the docs test: (.+)\)\s*$")
FENCE = re.compile(r"^(\s*)```(.*)$")
MAX_MARKED = 8  # "keep those few"
SAMPLES = "128"  # NNCOMPRESS_MAX_SAMPLES: one training batch per epoch
# pages whose snippets select ResNet layers ('layer*.conv*', exits after 'layer1'): there
# `model` and base.safetensors are a ResNet-20
RESNET_PAGES = {"lowrank.md", "conditional.md"}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    skip: str | None


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page, dedented, with the marker above each."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2).strip()
        j = i + 1
        while j < len(lines) and not FENCE.match(lines[j]):
            j += 1
        body = "\n".join(x[indent:] if x[:indent].strip() == "" else x for x in lines[i + 1 : j])
        above = next((x for x in reversed(lines[:i]) if x.strip()), "")
        mark = MARK.match(above)
        out.append(Block(page, i + 1, lang, body, mark.group(1) if mark else None))
        i = j + 1
    return out


def _tiny(text: str) -> str:
    text = re.sub(r"episodes=\d+", "episodes=6", text)
    text = re.sub(r'"warmup": \d+', '"warmup": 3', text)
    text = re.sub(r"--episodes \d+", "--episodes 6", text)
    return re.sub(r"--warmup \d+", "--warmup 3", text)


def _commands(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [x.strip() for x in joined.splitlines() if x.strip() and not x.strip().startswith("#")]


def _prelude(page: Path) -> dict:
    import torch
    from torch import nn

    import nncompress as nc
    from nncompress.core import LayerSelector
    from nncompress.engine import TrainConfig, load_checkpoint

    class MyNet(nn.Module):
        """A custom architecture (not in the registry)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 26 * 26, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    data = nc.fashion_mnist()
    model, _ = load_checkpoint("base.safetensors")
    teacher, _ = load_checkpoint("base.safetensors")
    return {
        "nc": nc,
        "torch": torch,
        "nn": nn,
        "TrainConfig": TrainConfig,
        "LayerSelector": LayerSelector,
        "data": data,
        "splits": data,
        "model": model,
        "teacher": teacher,
        "student": nc.create_model("lenet-5"),
        "train_loader": data.loader("train", 64),
        "calibration_loader": data.loader("val", 64),
        "example_input": data.val[0][:2],
        "MyNet": MyNet,
        "my_net": MyNet(),
        "lenet5": load_checkpoint("small.safetensors")[0],
        "resnet20": load_checkpoint("big.safetensors")[0],
    }


def _run_sh(block: Block, capsys) -> None:
    from nncompress.cli import main

    lines = [c.strip() for x in _commands(_tiny(block.text)) for c in x.split("&&")]
    for line in lines:
        if line.startswith((". ", "source ")):
            continue  # activating the virtual environment: the tests already run inside it
        argv = shlex.split(line, comments=True)
        assert argv[0] == "nncompress", f"'{line}': only nncompress commands are run"
        try:
            rc = main(argv[1:])
        except SystemExit as exc:  # argparse refused the command line
            rc = exc.code
        if rc != 0:
            err = capsys.readouterr().err
            raise AssertionError(f"'{line}' exited with {rc}: {err.strip()[-800:]}")


def _run_yaml(block: Block, tmp: Path) -> None:
    from nncompress.cli import main
    from nncompress.recipe import load_recipe

    data = yaml.safe_load(block.text)
    if isinstance(data, list):  # a list of stages
        data = {"stages": data}
    if "model" in data or "baseline" in data:
        path = tmp / f"block{block.line}.yaml"
        path.write_text(block.text)
        assert main(["run", str(path), "--out", str(tmp / f"run{block.line}"), "--quick"]) == 0
    else:  # a fragment: the stages of a recipe, checked in one
        load_recipe({"model": "lenet-5", "data": "fashion-mnist", "train": {"epochs": 1}, **data})


def _run_python(block: Block, ns: dict, tmp: Path) -> None:
    first = block.text.splitlines()[0].strip() if block.text.strip() else ""
    m = re.fullmatch(r"#\s*([\w.]+\.py)", first)
    if m:  # a file the page asks you to write
        (tmp / m.group(1)).write_text(block.text)
        return
    exec(compile(_tiny(block.text), f"{block.page.name}:{block.line}", "exec"), ns)  # noqa: S102


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A LeNet-5 and a ResNet-20 trained one epoch on 128 Fashion-MNIST images."""
    from nncompress.cli import main

    mp = pytest.MonkeyPatch()
    mp.setenv("NNCOMPRESS_MAX_SAMPLES", SAMPLES)
    d = tmp_path_factory.mktemp("docs")
    out = {"lenet5": d / "lenet5.safetensors", "resnet20": d / "resnet20.safetensors"}
    try:
        for model, path in (("lenet-5", out["lenet5"]), ("resnet-20", out["resnet20"])):
            argv = ["train", "--model", model, "--epochs", "1", "--quiet", "--out", str(path)]
            assert main(argv) == 0
    finally:
        mp.undo()
    return out


def _hf_files(tmp: Path) -> None:
    """transformers.md: ``my-bert/`` (a tiny random BERT with a WordPiece tokenizer, as the
    Hugging Face tests build it), ``calib.txt`` and ``heldout.txt``."""
    import torch

    from hf_tiny import VOCAB, bert, transformers

    words = [f"w{i}" for i in range(VOCAB - 5)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(tmp / "my-bert")
    bert().save_pretrained(tmp / "my-bert")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, 60, (12,), generator=g))]
    lines *= 48
    for name in ("calib.txt", "heldout.txt"):
        (tmp / name).write_text("\n".join(lines) + "\n")


#: per page, files its commands name beyond the checkpoints every page gets
PAGE_FILES = {"transformers.md": _hf_files}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))


def test_every_block_is_tagged_and_few_are_marked():
    marked = []
    for page in PAGES:
        for b in read_blocks(page):
            where = f"{page.relative_to(ROOT)}:{b.line}"
            assert b.lang in RUN | NOT_CODE, (
                f"{where}: fenced block with language {b.lang!r}; use one of "
                f"{sorted(RUN | NOT_CODE)} (text: not code)"
            )
            if b.skip:
                assert b.lang in RUN, f"{where}: a text block needs no marker"
                marked.append(where)
    assert len(marked) <= MAX_MARKED, f"too many blocks not run by the docs test: {marked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_runs(page, checkpoints, tmp_path, monkeypatch, capsys):
    blocks = [b for b in read_blocks(page) if b.lang in RUN and not b.skip]
    if not blocks:
        pytest.skip(f"{page.name} has no runnable block")
    monkeypatch.setenv("NNCOMPRESS_MAX_SAMPLES", SAMPLES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    base = checkpoints["resnet20" if page.name in RESNET_PAGES else "lenet5"]
    for name in ("base.safetensors", "model.safetensors"):
        _copy(base, tmp_path / name)
    for name in ("small.safetensors", "lenet5.safetensors"):
        _copy(checkpoints["lenet5"], tmp_path / name)
    for name in ("big.safetensors", "resnet20.safetensors"):
        _copy(checkpoints["resnet20"], tmp_path / name)
    baselines = tmp_path / "benchmarks" / "out" / "baselines"
    _copy(checkpoints["lenet5"], baselines / "lenet-5.safetensors")
    if page.name in PAGE_FILES:
        PAGE_FILES[page.name](tmp_path)
    ns = _prelude(page)
    modules = set(sys.modules)
    try:
        for b in blocks:
            try:
                if b.lang == "python":
                    _run_python(b, ns, tmp_path)
                elif b.lang == "yaml":
                    _run_yaml(b, tmp_path)
                else:
                    _run_sh(b, capsys)
            except Exception as exc:  # noqa: BLE001 - reported with the block
                tb = "".join(traceback.format_exception(exc)[-6:])
                pytest.fail(
                    f"{page.relative_to(ROOT)}:{b.line} ({b.lang}) failed: "
                    f"{type(exc).__name__}: {exc}\n{tb}\n--- block ---\n{b.text}\n---\nFix the block "
                    "(it must run as written), or put the line '(Not run by the docs test: "
                    "REASON)' above it.",
                    pytrace=False,
                )
    finally:
        for name in set(sys.modules) - modules:  # modules the page wrote (mynets.py)
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin.startswith(str(tmp_path)):
                sys.modules.pop(name, None)
