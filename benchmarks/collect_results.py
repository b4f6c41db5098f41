"""Assemble benchmarks/RESULTS.md from the per-benchmark files in benchmarks/results/.

Each benchmark script writes results/NAME.json and results/NAME.md (with the command, machine
and date); this script only concatenates them in a fixed order under a common header.

    python benchmarks/collect_results.py
"""

from __future__ import annotations

from _common import RESULTS, ROOT, machine

SECTIONS = [
    ("baselines", "Baselines (Fashion-MNIST)", "benchmarks/baselines.py"),
    (
        "pruning_han",
        "Connection pruning — Han et al. 2015, Table 1 style",
        "benchmarks/pruning_han.py",
    ),
    ("pruning_li", "Filter pruning — Li et al. 2017 style", "benchmarks/pruning_li.py"),
    (
        "pruning_li_lenet-5",
        "Filter pruning — LeNet-5, with the L1 / random / largest-first ablation",
        "benchmarks/pruning_li.py --model lenet-5",
    ),
    (
        "deep_compression",
        "Deep Compression — pruning + weight sharing + Huffman",
        "benchmarks/deep_compression.py",
    ),
    ("coding_throughput", "Entropy coder throughput", "benchmarks/coding_throughput.py"),
    (
        "fuzz_decoder",
        "Structured fuzzing of the .ncz decoder (issue 19)",
        "benchmarks/fuzz_decoder.py",
    ),
    (
        "coding_vs_nncodec",
        "Coding the same pruned + shared weights: ours vs NNCodec vs xz / zstd",
        "benchmarks/coding_vs_nncodec.py",
    ),
    (
        "rate_aware",
        "Rate-aware pipelines (ECSQ + RD pruning + context coding)",
        "benchmarks/rate_aware.py",
    ),
    *(
        (
            f"rate_aware_{m}",
            f"Rate-aware pipeline, {m}",
            f"benchmarks/rate_aware.py --models {m}",
        )
        for m in ("lenet-300-100", "lenet-5")
    ),
    (
        "linear_quant",
        "Linear INT8 / INT4 quantization with ONNX Runtime",
        "benchmarks/linear_quant.py",
    ),
    ("lowrank", "Low-rank decomposition", "benchmarks/lowrank.py"),
    (
        "lowrank_latency",
        "Low-rank decomposition — interleaved latency",
        "benchmarks/lowrank_latency.py",
    ),
    ("distill-lenet-5", "Knowledge distillation", "benchmarks/distill.py --teacher lenet-5"),
    ("pq", "Product quantization — Stock et al. 2020", "benchmarks/pq.py"),
    ("amc", "Automated compression policy — AMC (He et al. 2018)", "benchmarks/amc.py"),
]


def main() -> None:
    m = machine()
    parts = [
        "# Benchmark results\n",
        "Every number below was produced by the script named in its section on the machine "
        "stated there (the project's 2-core CPU machine unless said otherwise). Re-run a script "
        "to refresh its section, then `python benchmarks/collect_results.py` to rebuild this "
        "page. Latency figures are medians of repeated runs after warm-up; on a shared 2-core "
        "machine they carry noise of roughly +-10-20%.\n",
        "Load: the sections dated before 13:15 UTC on 2026-11-23 (baselines, coding throughput, "
        "the LeNet-5 filter-pruning ablation, INT8/INT4 on LeNet-5, distillation) ran "
        "while up to seven jobs shared the two cores (load average 12-16); the later re-runs "
        "(connection and filter pruning, Deep Compression, ResNet-20 quantization, low-rank and its latency) ran "
        "two or three at a time. Wall times are inflated accordingly. Each section states any "
        "budget it cut; targets a run misses are reported as missed.\n",
        f"Last assembled: {m['date']} (torch {m['torch']}, Python {m['python']}).\n",
    ]
    for name, title, script in SECTIONS:
        md = RESULTS / f"{name}.md"
        parts.append(f"## {title}\n")
        if md.is_file():
            parts.append(md.read_text().strip() + "\n")
        else:
            parts.append(f"_Not measured yet: run `python {script}`._\n")
    (ROOT / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
