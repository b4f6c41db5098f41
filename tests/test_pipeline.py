"""The recipe runner end to end on 8x8 digits: train -> prune -> share -> finetune -> encode,
report fields, decoded-file accuracy, resume after an interruption, and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nncompress.engine import evaluate, load_checkpoint
from nncompress.io import decode_file
from nncompress.io.checkpoint import model_from_metadata
from nncompress.recipe import load_recipe, run_recipe


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared cores
    yield
    torch.set_num_threads(n)


def _recipe(stages):
    return {
        "name": "tiny",
        "model": "lenet-300-100",
        "data": "digits",
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "stages": stages,
    }


FULL = [
    {"stage": "train"},
    {"stage": "prune", "sparsity": 0.8, "per_layer": {"fc3": 0.5}, "epochs": 1},
    {"stage": "share", "bits_fc": 4, "per_layer": {"fc3": 5}},
    {"stage": "finetune", "epochs": 1},
    {"stage": "encode"},
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, digits_data):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    report = run_recipe(_recipe(FULL), out)
    return out, report


def test_end_to_end_report_and_decoded_accuracy(full_run, digits_data):
    out, report = full_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["final_accuracy"] == pytest.approx(report["final_accuracy"])
    # the final accuracy is that of the decoded file, evaluated independently here
    state, meta = decode_file(out / "model.ncz")
    model, _ = model_from_metadata(meta)
    model.load_state_dict(state)
    acc = evaluate(model, digits_data.loader("test", 512))["accuracy"]
    assert report["final_accuracy"] == acc
    assert report["final_accuracy_source"] == "decoded model.ncz"
    # sizes
    n_params = sum(p.numel() for p in model.parameters())
    assert report["original_bytes"] == 4 * n_params
    assert report["compressed_bytes"] == (out / "model.ncz").stat().st_size
    assert report["compression_ratio"] == pytest.approx(
        report["original_bytes"] / report["compressed_bytes"]
    )
    assert report["compression_ratio"] > 10
    # the baseline is the trained model before compression
    assert report["baseline_accuracy"] == report["stages"][0]["accuracy"]
    assert report["baseline_accuracy"] > 50
    # per stage fields
    names = [s["name"] for s in report["stages"]]
    assert names == ["train", "prune", "share", "finetune", "encode"]
    for s in report["stages"]:
        assert {"name", "accuracy", "nonzeros", "size_bytes", "wall_time_s"} <= set(s)
        assert (out / s["checkpoint"]).is_file()
    nz = [s["nonzeros"] for s in report["stages"]]
    assert nz[0] == n_params and nz[1] < 0.3 * n_params and nz[1] == nz[2] == nz[3] == nz[4]
    assert report["stages"][-1]["size_bytes"] == report["compressed_bytes"]
    # the encode stage's in-memory model is exactly what the file decodes to
    assert report["stages"][-1]["accuracy"] == acc
    # per-layer table (Deep Compression Tables 2-3)
    layers = {r["name"]: r for r in report["layers"]}
    assert set(layers) == {"fc1", "fc2", "fc3", "total"}
    assert layers["fc1"]["kept_percent"] == pytest.approx(20.0, abs=0.01)
    assert layers["fc3"]["kept_percent"] == pytest.approx(50.0, abs=0.01)
    assert layers["fc1"]["weight_bits_pq"] == 4
    # 32 shared values; stored densely (one code per weight) zero is a 33rd symbol
    dense = layers["fc3"]["scheme"] == "codebook-dense"
    assert layers["fc3"]["weight_bits_pq"] == (6 if dense else 5)
    md = (out / "report.md").read_text()
    assert "| fc1 |" in md and "weight bits P+Q" in md and "index bits H" in md


def test_decoded_weights_are_shared_and_pruned(full_run):
    out, _ = full_run
    state, _ = decode_file(out / "model.ncz")
    pruned, _ = load_checkpoint(out / "stages" / "02-prune.safetensors")
    for name, bits in (("fc1", 4), ("fc2", 4), ("fc3", 5)):
        w = state[f"{name}.weight"]
        nz = w[w != 0]
        assert len(torch.unique(nz)) <= 2**bits
        # pruned weights stayed exactly zero through share, finetune and encode
        assert torch.equal(w != 0, getattr(pruned, name).weight != 0)


def test_resume_skips_finished_stages_and_rebuilds_state(tmp_path):
    stages = [
        {"stage": "train"},
        {"stage": "prune", "sparsity": 0.7, "epochs": 1},
        {"stage": "share", "bits_fc": 3},
        {"stage": "finetune", "epochs": 1},
    ]
    recipe = load_recipe(_recipe(stages))
    first = run_recipe(recipe, tmp_path)
    ckpts = {s["name"]: tmp_path / s["checkpoint"] for s in first["stages"]}
    mtimes = {n: p.stat().st_mtime_ns for n, p in ckpts.items()}
    # simulate an interruption during the last stage: its outputs are gone
    last = ckpts["finetune"]
    last.unlink()
    last.with_suffix(".json").unlink()
    seen = []

    def progress(ev):
        if ev.task == "recipe" and ev.kind == "advance" and "stage" in ev.info:
            seen.append(ev.info["stage"])

    second = run_recipe(recipe, tmp_path, progress=progress)
    assert seen == ["finetune"]  # only the missing stage ran again
    for n in ("train", "prune", "share"):
        assert ckpts[n].stat().st_mtime_ns == mtimes[n]
    # the resumed run reports the earlier stages as they were, marked as not run again
    assert [e.pop("this_run") for e in first["stages"]] == [True] * 4
    assert [e.pop("this_run") for e in second["stages"]] == [False] * 3 + [True]
    assert second["stages"][:3] == first["stages"][:3]
    assert second["baseline_accuracy"] == first["baseline_accuracy"]
    # masks and codebooks were rebuilt: the resumed fine-tuning kept zeros and shared values
    shared, _ = load_checkpoint(ckpts["share"])
    final, _ = load_checkpoint(last)
    for name in ("fc1", "fc2", "fc3"):
        w, w0 = getattr(final, name).weight, getattr(shared, name).weight
        assert torch.equal(w != 0, w0 != 0)
        assert len(torch.unique(w[w != 0])) <= 8
    assert not torch.equal(final.fc1.weight, shared.fc1.weight)  # it did train
    # a fully finished run resumes with nothing to do
    seen.clear()
    run_recipe(recipe, tmp_path, progress=progress)
    assert seen == []
    # a different recipe in the same folder is refused unless resume=False
    other = load_recipe(_recipe(stages[:2]))
    with pytest.raises(ValueError, match="different recipe"):
        run_recipe(other, tmp_path)


def test_cli_run_check_and_quick(tmp_path, capsys):
    import yaml

    from nncompress.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe([{"stage": "train"}, {"stage": "share"}])))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--check"]) == 0
    assert "valid (2 stages)" in " ".join(capsys.readouterr().out.split())
    rc = main(["run", str(path), "--out", str(tmp_path / "o"), "--quick", "--quiet", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["stages"]] == ["train", "share"]
    assert report["compressed_bytes"] is None  # no encode stage
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_recipe([{"stage": "share", "bits_fc": 40}])))
    assert main(["run", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "bits_fc=40" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o")
