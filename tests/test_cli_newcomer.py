"""Issue 13, the CLI a newcomer reaches for: each of its 8 points driven through the real
``nncompress`` entry point in a subprocess, on scikit-learn's digits (or 128 Fashion-MNIST
images) with 1-epoch settings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "nncompress"  # the installed console script
ENTRY = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "nncompress.cli"]


def nc(*args: str, cwd: Path, env: dict | None = None, check: int | None = 0):
    """Run ``nncompress ARGS`` (stdout and stderr are pipes, not a terminal)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    full_env.update(env or {})
    res = subprocess.run(
        [*ENTRY, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )
    if check is not None:
        assert res.returncode == check, f"nncompress {' '.join(args)}: {res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A folder with a LeNet-300-100 trained 1 epoch on digits: base.safetensors."""
    d = tmp_path_factory.mktemp("newcomer")
    nc("train", "--model", "lenet-300-100", "--dataset", "digits", "--epochs", "3",
       "--out", "base.safetensors", cwd=d)  # fmt: skip
    return d


TINY_RECIPE = """\
name: tiny
model: lenet-300-100
data: digits
train: {epochs: 2, batch_size: 64, seed: 0}
quick: {epochs: 1}
stages:
  - {stage: train}
  - {stage: prune, sparsity: 0.8, epochs: 1}
  - {stage: share, bits_fc: 4}
  - {stage: finetune, epochs: 1}
  - {stage: encode, codec: huffman}
"""


# ---------------------------------------------------------------- 1. threads


def test_1_threads_on_every_command_and_applied(ws):
    from nncompress.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [n for n, p in sub.choices.items() if "--threads" not in p._option_string_actions]
    assert not missing, f"commands without --threads: {missing}"
    res = nc("-v", "stats", "base.safetensors", "--threads", "1", "--batches", "1", cwd=ws)
    assert "threads: 1" in res.stderr and "(auto)" not in res.stderr
    res = nc("-v", "stats", "base.safetensors", "--batches", "", cwd=ws)
    assert "threads: 1 (auto)" in res.stderr  # auto reads OMP_NUM_THREADS=1
    res = nc("stats", "base.safetensors", "--threads", "0", cwd=ws, check=2)
    assert "--threads='0'" in res.stderr


def test_1_auto_threads_uses_idle_cpus(monkeypatch):
    from nncompress.cli import common

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    assert common.auto_threads() == 1  # 4 CPUs, 3 busy
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert common.auto_threads() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert common.auto_threads() == 8  # capped
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert common.auto_threads() == 3


# ---------------------------------------------------------------- 2. sparse storage, share


def test_2_pruned_model_is_stored_sparse_and_share_command(ws):
    from nncompress.engine import load_checkpoint
    from nncompress.io import decode_file

    nc("prune", "base.safetensors", "--sparsity", "0.9", "--out", "p.safetensors", cwd=ws)
    res = nc("encode", "p.safetensors", "--out", "p.ncz", "--json", cwd=ws)
    rep = json.loads(res.stdout)
    schemes = {t["name"]: t["scheme"] for t in rep["tensors"]}
    assert schemes["fc1.weight"] == schemes["fc2.weight"] == "sparse"
    assert rep["total_bytes"] < 0.3 * rep["original_bytes"]  # 10% of the values + positions
    pruned, _ = load_checkpoint(ws / "p.safetensors")
    state, _ = decode_file(ws / "p.ncz")
    for name, t in pruned.state_dict().items():  # bit-exact (-0.0 stored as +0.0)
        assert torch.equal(state[name], torch.where(t == 0, torch.zeros(()), t)), name
    text = nc("inspect", "p.ncz", cwd=ws).stdout
    assert "sparse32" in text or "sparse16" in text

    res = nc("share", "p.safetensors", "--bits", "4", "--out", "s.ncz", "--json", cwd=ws)
    out = json.loads(res.stdout)
    assert {r["bits"] for r in out["layers"]} == {4}
    assert out["test_accuracy_decoded"] == pytest.approx(out["test_accuracy_after"])
    shared, _ = decode_file(ws / "s.ncz")
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        w = shared[name]
        assert torch.unique(w[w != 0]).numel() <= 16
        assert torch.equal(w != 0, pruned.state_dict()[name] != 0)  # zeros stay zeros
    assert out["file_bytes"] < rep["total_bytes"]


# ---------------------------------------------------------------- 3. .ncz files everywhere


def test_3_every_command_takes_a_ncz_and_python_files_decode(ws, tmp_path):
    # (every command opens its model with cli.common.open_model / CheckpointJob: eval, stats
    # and a transforming command stand for the others)
    nc("encode", "base.safetensors", "--out", "base.ncz", cwd=ws)
    assert "test accuracy" in nc("eval", "base.ncz", cwd=ws).stdout
    nc("stats", "base.ncz", "--batches", "1", cwd=ws)
    nc("decompose", "base.ncz", "--method", "svd", "--rank", "8",
       "--out", str(tmp_path / "d.safetensors"), cwd=ws)  # fmt: skip
    # a .ncz saved from Python, as the README's snippet does
    script = (
        "import nncompress as nc, torch\n"
        "torch.manual_seed(0)\n"
        "model = nc.create_model('lenet-300-100', in_features=64)\n"
        "nc.prune_(model, nc.MagnitudeConfig(sparsity=0.9))\n"
        "nc.share_weights_(model, nc.KMeansConfig(bits_fc=5))\n"
        "nc.save_compressed(model, 'py.ncz', nc.EncodeConfig(codec='huffman'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True)
    nc("decode", "py.ncz", "--out", "py.safetensors", cwd=tmp_path)
    assert (tmp_path / "py.json").is_file()
    res = nc("eval", "py.ncz", cwd=tmp_path, check=2)
    assert "does not record its dataset: pass --dataset" in res.stderr
    assert "test accuracy" in nc("eval", "py.ncz", "--dataset", "digits", cwd=tmp_path).stdout


# ---------------------------------------------------------------- 4. custom models


MYNETS = """\
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


def make_net():
    return Net()
"""


def test_4_model_factory(tmp_path):
    (tmp_path / "mynets.py").write_text(MYNETS)
    f = ["--model-factory", "mynets:make_net"]
    nc("train", *f, "--dataset", "digits", "--epochs", "1", "--out", "m.safetensors", cwd=tmp_path)
    res = nc("eval", "m.safetensors", cwd=tmp_path, check=2)
    assert "pass --model-factory mynets:make_net" in res.stderr
    nc("prune", "m.safetensors", *f, "--sparsity", "0.8", "--out", "p.safetensors", cwd=tmp_path)
    nc("encode", "p.safetensors", *f, "--out", "p.ncz", cwd=tmp_path)
    out = nc("eval", "p.ncz", *f, "--json", cwd=tmp_path).stdout
    assert json.loads(out)["samples"] > 0
    res = nc("eval", "p.ncz", cwd=tmp_path, check=2)
    assert "--model-factory" in res.stderr
    nc("decode", "p.ncz", *f, "--out", "d.safetensors", cwd=tmp_path)
    res = nc("eval", "m.safetensors", "--model-factory", "mynets:nope", cwd=tmp_path, check=2)
    assert "'mynets' has no 'nope'" in res.stderr


# ---------------------------------------------------------------- 5. defaults that keep accuracy


def test_5_prune_allocates_a_model_wide_target_and_refuses_nothing(ws, tmp_path):
    out = tmp_path / "g.safetensors"
    res = nc("prune", "base.safetensors", "--sparsity", "0.9", "--out", str(out), cwd=ws)
    assert "allocation (global magnitude ranking" in res.stdout
    assert "predicted drop: held-out" in res.stdout
    rep = json.loads(
        nc(
            "prune", "base.safetensors", "--sparsity", "0.9", "--json", "--out", str(out), cwd=ws
        ).stdout  # fmt: skip
    )
    per = rep["allocation"]["per_layer"]
    assert rep["allocation"]["method"] == "global" and len(set(per.values())) > 1
    kept = sum(r["kept"] for r in rep["layers"].values())
    total = sum(r["params"] for r in rep["layers"].values())
    assert abs(kept / total - 0.1) < 0.005  # the model-wide target is met
    floor = 0.3 * 0.1
    assert all(r["kept_fraction"] >= floor - 1e-3 for r in rep["layers"].values())
    uni = json.loads(
        nc(
            "prune",
            "base.safetensors",
            "--sparsity",
            "0.9",
            "--allocate",
            "uniform",
            "--json",
            "--out",
            str(out),
            cwd=ws,
        ).stdout  # fmt: skip
    )
    assert {round(r["kept_fraction"], 3) for r in uni["layers"].values()} == {0.1}
    res = nc("prune", "base.safetensors", "--out", str(out), cwd=ws, check=2)
    assert "nothing to prune" in res.stderr
    res = nc("prune", "base.safetensors", "--method", "filter-l1", "--out", str(out), cwd=ws,
             check=2)  # fmt: skip
    assert "nothing to prune" in res.stderr


def test_5_decompose_keeps_the_classifier_and_spends_the_budget_by_response(ws, tmp_path):
    out = str(tmp_path / "d.safetensors")
    res = nc("decompose", "base.safetensors", "--method", "svd", "--params-budget", "0.3",
             "--json", "--out", out, cwd=ws)  # fmt: skip
    rep = json.loads(res.stdout)
    assert rep["finetune"]["classifier_kept"] == "fc3"
    assert rep["allocation"] == "response" and rep["budget_met"]
    assert "fc3" not in {x["name"] for x in rep["layers"] if x["status"] == "decomposed"}
    with_cls = json.loads(
        nc(
            "decompose",
            "base.safetensors",
            "--method",
            "svd",
            "--params-budget",
            "0.3",
            "--include-classifier",
            "--json",
            "--out",
            out,
            cwd=ws,
        ).stdout  # fmt: skip
    )
    assert any(x["name"] == "fc3" for x in with_cls["layers"])


# ---------------------------------------------------------------- 6. logs, pipes, Ctrl-C


def test_6_full_tables_and_lines_in_logs(ws, tmp_path):
    res = nc("models", cwd=ws)
    assert "…" not in res.stdout
    assert (
        "| lenet-300-100 | 266,610 | MLP 784-300-100-10 (Han 2015), 266,610 params |" in res.stdout
    )
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    res = nc("run", "r.yaml", "--out", "run", cwd=tmp_path)
    assert re.search(r"^stage 1/5: train$", res.stderr, re.M)
    assert re.search(r"^train: epoch 2/2 ", res.stderr, re.M)
    assert "| 5 | encode |" in res.stdout
    again = nc("run", "r.yaml", "--out", "run", cwd=tmp_path)
    assert "holds a finished run of this recipe" in again.stderr
    assert re.search(r"\| 1 \| train \|.*\*", again.stdout)  # old wall time marked
    assert "finished by an earlier run" in again.stdout
    assert "epoch" not in again.stderr  # nothing trained again


def test_6_ctrl_c_keeps_the_stages_and_resumes(tmp_path):
    recipe = TINY_RECIPE.replace("epochs: 1}\n  - {stage: share", "epochs: 400}\n  - {stage: share")
    (tmp_path / "r.yaml").write_text(recipe)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*ENTRY, "run", "r.yaml", "--out", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT and children inherit that; Python only turns
        # SIGINT into KeyboardInterrupt when it starts with the default disposition
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    state = tmp_path / "run" / "state.json"
    deadline = time.time() + 300
    while not state.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the long prune stage
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert "Traceback" not in err
    assert "interrupted: 1/5 stages finished and saved in run" in err
    assert "run the same command again to resume after stage 1" in err
    short = recipe.replace("epochs: 400}", "epochs: 1}")
    (tmp_path / "r.yaml").write_text(short)  # a different recipe is refused, not overwritten
    res = nc("run", "r.yaml", "--out", "run", cwd=tmp_path, check=2)
    assert "different recipe" in res.stderr
    (tmp_path / "r.yaml").write_text(recipe)
    res = subprocess.Popen(
        [*ENTRY, "run", "r.yaml", "--out", "run"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    for line in res.stderr:  # stop it as soon as it says what it does
        seen.append(line)
        if "resuming" in line or line.startswith("stage "):
            break
    res.send_signal(signal.SIGINT)
    res.communicate(timeout=120)
    assert "resuming run after stage 1/5 (train): stages 1-1 are not run again" in seen[-1]


def test_6_demo_never_overwrites(tmp_path):
    other = tmp_path / "demo"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = nc("demo", "--out", str(other), cwd=tmp_path, check=2)
    assert "does not overwrite it" in res.stderr
    assert (other / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- 7. docs run as written


def test_7_help_shows_defaults_and_no_literal_percent(ws):
    res = nc("prune", "--help", cwd=ws)
    assert "%%" not in res.stdout
    text = " ".join(res.stdout.split())
    assert "Filter pruning with physical thinning" in text and "filter-l1" in text
    assert "--iterations ITERATIONS prune -> retrain cycles (default" in text
    assert "--threads THREADS" in text and "(default: auto)" in text
    top = nc("--help", cwd=ws)
    assert "share" in top.stdout and "threads" in top.stdout


def test_7_readme_api_names_exist():
    import nncompress

    readme = (ROOT / "README.md").read_text()
    para = readme[
        readme.index("## Python API") : readme.index("```python", readme.index("## Python API"))
    ]
    names = set(re.findall(r"`([A-Za-z][A-Za-z0-9_]*)`", para)) - {"filter", "nn"}
    names |= {m for m in re.findall(r"`([A-Za-z_]+)\(", para)}
    assert {"magnitude_mask", "kmeans_1d", "KMeansQuantizer", "LayerSelector"} <= names
    missing = sorted(n for n in names if not hasattr(nncompress, n))
    assert not missing, f"README lists {missing} but nncompress.* lacks them"


# ---------------------------------------------------------------- 8. figures


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_7_and_8_quick_run_note_and_figures_of_run_and_demo(tmp_path):
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    res = nc("run", "r.yaml", "--out", "run", "--quick", cwd=tmp_path)
    assert "note: --quick trained the baseline for only 1 epoch(s)" in res.stdout  # point 7
    md = (tmp_path / "run" / "report.md").read_text()
    for name in ("stages.png", "layers.png", "sharing.png"):
        assert _png(tmp_path / "run" / name) and f"]({name})" in md
    res = nc("demo", "--out", "demo", cwd=tmp_path, env={"NNCOMPRESS_MAX_SAMPLES": "128"})
    assert "figures: stages.png, layers.png, sharing.png" in res.stdout
    for name in ("stages.png", "layers.png", "sharing.png"):
        assert _png(tmp_path / "demo" / name)
