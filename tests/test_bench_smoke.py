"""Every benchmark script runs end to end in --smoke mode (tiny synthetic data, tiny baselines
trained on the fly, one epoch), so that a script that rots fails the test suite.

The scripts run in-process, in `make bench` order, into one temporary results tree. A row a
script could not measure (an optional peer package missing) is reported by the script in its
results and re-raised here as a warning: nothing is skipped silently.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# script -> the results files its smoke run must write
SCRIPTS = {
    "baselines": ["baselines"],
    "pruning_han": ["pruning_han"],
    "pruning_li": ["pruning_li-lenet-5"],
    "deep_compression": ["deep_compression"],
    "coding_throughput": ["coding_throughput"],
    "fuzz_decoder": ["fuzz_decoder"],
    "coding_vs_nncodec": ["coding_vs_nncodec_smoke"],
    "rate_aware": ["rate_aware_lenet-300-100_smoke"],
    "linear_quant": ["linear_quant-lenet-5"],
    "ort_int8_kernels": ["ort_int8_kernels"],
    "lowrank": ["lowrank-lenet300-lenet5"],
    "lowrank_latency": ["lowrank_latency"],
    "distill": ["distill-lenet-5"],
    "pq": [],  # its smoke run measures every row but merges nothing into results (pq.py main)
    "early_exit_joint": ["early_exit_joint_smoke"],  # before early_exit, which merges it
    "early_exit": ["early_exit_smoke"],
    "transformers": ["transformers-smoke"],
    "amc": ["amc_smoke"],
    "mobile": ["mobile_int8", "mobile_filter", "mobile_deep"],
}
EXTRA_ARGS = {"pruning_li": ["--model", "lenet-5"]}
# runs before the script's own smoke run, as in `make bench` (collect_results.BEFORE)
PRE_ARGS = {"pq": [["--explore"]]}
# results written as a bare JSON part (no markdown page, no machine record) for another script
PARTS_ONLY = {"early_exit_joint_smoke"}
# modules imported by the scripts, or run inside the NNCodec environment: not scripts
HELPERS = {"collect_results", "mobile_parts", "nncodec_env", "nncodec_worker"}


def _load(script: str):
    """The benchmark script as a module. benchmarks/transformers.py shares its name with the
    Hugging Face package (imported by other tests), so it is loaded from its path under another
    name; the others by name, so that helper modules (mobile_parts -> mobile) see the same one."""
    if script != "transformers":
        return importlib.import_module(script)
    spec = importlib.util.spec_from_file_location("bench_transformers", BENCH / "transformers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    yield tmp_path_factory.mktemp("bench-smoke")
    sys.path.remove(str(BENCH))


def test_every_script_has_a_smoke_test():
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(SCRIPTS) | HELPERS


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_smoke(script, smoke_dir):
    mod = _load(script)
    for pre in PRE_ARGS.get(script, []):
        mod.main(["--smoke", "--results-dir", str(smoke_dir), *pre])
    rc = mod.main(["--smoke", "--results-dir", str(smoke_dir), *EXTRA_ARGS.get(script, [])])
    assert rc in (None, 0)
    nncodec = BENCH / ".venv-nncodec" / "bin" / "python"
    if script == "coding_vs_nncodec" and not nncodec.is_file():
        msg = "coding_vs_nncodec --smoke: NNCodec rows not run (no make nncodec-venv)"
        warnings.warn(msg, stacklevel=1)
    for name in SCRIPTS[script]:
        data = json.loads((smoke_dir / "results" / f"{name}.json").read_text())
        if name in PARTS_ONLY:
            assert data["settings"]["smoke"] is True
            continue
        assert data["smoke"] is True
        assert data["command"].startswith(f"python {script}.py --smoke")
        m = data["machine"]
        assert m["cpu_flags"] is not None and m["cores"] >= 1 and m["torch"]
        assert m["load_average"]["samples"] >= 1
        if isinstance(data.get("parts"), dict):  # merged: timed by its parts (collect_results)
            assert all(p["wall_s"] > 0 for p in data["parts"].values())
        if script == "transformers":
            assert data["compute_s"] > 0
        md = (smoke_dir / "results" / f"{name}.md").read_text()
        assert md.startswith("_Command (from benchmarks/): `python ")
        for row in data.get("summary", []):
            if "lost_vs_baseline" not in row:  # a script's own summary, not a protocol row
                continue
            assert row["test"] and row["val"] and len(row["test"]) == len(row["seeds"])
        skipped = [s for r in data.get("runs", []) if isinstance(r, dict)
                   for s in r.get("skipped", [])]  # fmt: skip
        for s in skipped:
            assert "not installed" in s, s  # only a missing optional peer may be skipped
            warnings.warn(f"{script} --smoke: {s}", stacklevel=1)


def test_collect_results_smoke(smoke_dir):
    if not list((smoke_dir / "results").glob("*.json")):  # run alone: one smoke result first
        _load("coding_throughput").main(["--smoke", "--results-dir", str(smoke_dir)])
    mod = importlib.import_module("collect_results")
    mod.main(["--smoke", "--results-dir", str(smoke_dir)])
    text = (smoke_dir / "RESULTS.md").read_text()
    assert text.startswith("# Benchmark results") and "## Summary" in text
    assert "a --smoke run" in text  # smoke results are marked as such


def test_section_compute_prefers_the_scripts_own_total():
    sys.path.insert(0, str(BENCH))
    try:
        from collect_results import section_compute
    finally:
        sys.path.remove(str(BENCH))
    parts = {"a": {"wall_s": 10.0}, "b": {"wall_s": 5.0}}
    assert section_compute({"compute_s": 7.0, "run_wall_s": 3.0, "parts": parts}) == 7.0
    assert section_compute({"compute_s": None, "run_wall_s": 3.0}) is None  # resumed: unknown
    # a merged section costs all its parts, not only those the last run wrote
    assert section_compute({"run_wall_s": 3.0, "parts": parts}) == 15.0
    assert section_compute({"run_wall_s": 3.0, "parts": {**parts, "c": {}}}) == 3.0
    assert section_compute({"parts": {**parts, "c": {}}}) is None  # a part without its time
    assert section_compute({"rows": []}) is None


def test_makefile_runs_the_published_commands():
    sys.path.insert(0, str(BENCH))
    try:
        from collect_results import published_commands
    finally:
        sys.path.remove(str(BENCH))
    make = (BENCH.parent / "Makefile").read_text()
    bench = make.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    ran = re.findall(r"\$\(BENCH_PY\) (\S+\.py[^;&\n\\]*)", bench)
    assert [f"python {c.strip()}" for c in ran] == published_commands()


def test_baselines_report_rebuild_keeps_the_training_command(tmp_path):
    """`baselines.py --report-only` publishes the rows under the command that trained them
    (recorded in each row) and says that it only rebuilt the report."""
    rows = tmp_path / "results" / "baselines"
    rows.mkdir(parents=True)
    recipe = {"epochs": 1, "lr": 0.1, "augment": False}
    for model in ("lenet-5", "lenet-300-100"):
        row = {"model": model, "val_accuracy": 90.0, "test_accuracy": 89.0, "target": 89.5,
               "wall_time_s": 1.0, "recipe": recipe, "command": "python baselines.py"}  # fmt: skip
        (rows / f"{model}.json").write_text(json.dumps(row))

    def rebuild() -> dict:
        sys.path.insert(0, str(BENCH))
        try:
            argv = ["--smoke", "--results-dir", str(tmp_path), "--report-only"]
            importlib.import_module("baselines").main(argv)
        finally:
            sys.path.remove(str(BENCH))
        return json.loads((tmp_path / "results" / "baselines.json").read_text())

    data = rebuild()
    assert data["command"] == "python baselines.py"
    assert data["report_rebuilt_by"].endswith("--report-only")
    assert "rebuilt by `python baselines.py --smoke" in (rows.parent / "baselines.md").read_text()
    # rows trained by different commands: the section is the rebuilding run's
    row = json.loads((rows / "lenet-5.json").read_text())
    (rows / "lenet-5.json").write_text(json.dumps({**row, "command": "python baselines.py -x"}))
    data = rebuild()
    assert data["command"].endswith("--report-only")
