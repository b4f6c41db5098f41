"""Assemble benchmarks/RESULTS.md from the per-benchmark files in benchmarks/results/.

SECTIONS is the list of published sections: each is produced by exactly one command (run from
benchmarks/), the command `make bench` runs. Every script stores its full command line, the
machine record and its results in results/NAME.json and results/NAME.md; this script opens
RESULTS.md with a one-screen summary of the headline rows (taken from the JSON files), then
concatenates the sections in order, flags any section produced by another command than the
published one, and estimates the duration of `make bench` from the measured compute times.

    python collect_results.py [--results-dir DIR] [--out FILE]
    python collect_results.py --commands     # print the published commands, one a line
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import ROOT

# (results name, title, published command run from benchmarks/)
SECTIONS = [
    ("baselines", "Baselines (Fashion-MNIST)", "python baselines.py"),
    ("pruning_han", "Connection pruning — Han et al. 2015, Table 1 style", "python pruning_han.py"),
    (
        "pruning_li-resnet-20",
        "Filter pruning — Li et al. 2017, ResNet-20",
        "python pruning_li.py --model resnet-20",
    ),
    (
        "pruning_li-lenet-5",
        "Filter pruning — Li et al. 2017, LeNet-5 with the L1 / random / largest ablation",
        "python pruning_li.py --model lenet-5",
    ),
    (
        "deep_compression",
        "Deep Compression — pruning + weight sharing + Huffman",
        "python deep_compression.py",
    ),
    ("coding_throughput", "Entropy coder throughput", "python coding_throughput.py"),
    ("fuzz_decoder", "Structured fuzzing of the .ncz decoder (issue 19)", "python fuzz_decoder.py"),
    (
        "coding_vs_nncodec",
        "Coding the same pruned + shared weights: ours vs NNCodec vs xz / zstd",
        "python coding_vs_nncodec.py --seeds 0 1 2",
    ),
    *(
        (
            f"rate_aware_{m}",
            f"Rate-aware pipeline (ECSQ + RD pruning + context coding) — {m}",
            f"python rate_aware.py --models {m} --seeds 0 1 2",
        )
        for m in ("lenet-300-100", "lenet-5")
    ),
    (
        "linear_quant-lenet-5",
        "Linear INT8 / INT4 quantization with ONNX Runtime — LeNet-5",
        "python linear_quant.py --model lenet-5",
    ),
    (
        "linear_quant-resnet-20",
        "Linear INT8 / INT4 quantization with ONNX Runtime — ResNet-20",
        "python linear_quant.py --model resnet-20",
    ),
    (
        "ort_int8_kernels",
        "onnxruntime's int8 kernels on this CPU (VNNI, 7-bit vs 8-bit weights)",
        "python ort_int8_kernels.py",
    ),
    ("lowrank-lenet300-lenet5", "Low-rank decomposition — LeNets", "python lowrank.py"),
    (
        "lowrank-resnet20",
        "Low-rank decomposition — ResNet-20",
        "python lowrank.py --parts resnet20 --seeds 0",
    ),
    (
        "lowrank_latency",
        "Low-rank decomposition — paired latency",
        "python lowrank_latency.py",
    ),
    ("distill-lenet-5", "Knowledge distillation", "python distill.py"),
    ("pq", "Product quantization — Stock et al. 2020", "python pq.py --parts resnet20 --seeds 0"),
    (
        "early_exit",
        "Early exits and cascades (BranchyNet, Teerapittayanon et al. 2016)",
        "python early_exit.py",
    ),
    (
        "transformers-gpt-vit",
        "Transformers — ViT-tiny and char-GPT",
        "python transformers.py --parts vit,gpt --seeds 0,1,2",
    ),
    (
        "transformers-time",
        "Transformers — compression wall time of a 19M-parameter GPT",
        "python transformers.py --parts time",
    ),
    (
        "amc",
        "Automated compression policy — AMC (He et al. 2018)",
        "python amc.py --parts resnet --seeds 3 --epochs 2 --episodes 120 --warmup 40 "
        "--train-limit 20000",
    ),
    *(
        (f"mobile_{part}", f"Mobile networks — {title}", f"python mobile.py --parts {part}")
        for part, title in (
            ("baselines", "baselines (MobileNetV2, EfficientNet-lite)"),
            ("int8", "INT8 post-training quantization"),
            ("filter", "filter pruning"),
            ("deep", "pruning + weight sharing + coding"),
        )
    ),
]
# commands `make bench` runs before a section's own command: they write parts that the section's
# script reads or merges (pq.py reads out/pq/explore; early_exit.py reads early_exit_joint.json; amc.py merges
# amc_<part>.json, the LeNet part published with the defaults)
BEFORE = {
    # pq.py takes each LeNet row's blocks / lr from its exploration; ResNet-20 (7-13 min a row)
    # has one seed, the LeNets three
    "pq": ["python pq.py --explore", "python pq.py --parts lenet300,lenet5 --seeds 0,1,2"],
    "early_exit": ["python early_exit_joint.py"],
    "amc": ["python amc.py --parts lenet"],
}


def published_commands() -> list[str]:
    """Every command of `make bench`, in order (collect_results.py itself last)."""
    cmds = []
    for name, _, cmd in SECTIONS:
        cmds += [*BEFORE.get(name, []), cmd]
    return [*cmds, "python collect_results.py"]


def _pm(xs: list[float] | None) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.2f} (1 seed)"
    s = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{m:.2f} ± {s:.2f} (n={len(xs)})"


def summary_table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| section | model | method | size | test acc. % | held-out acc. % | lost vs "
        "baseline | lost vs dense control | target | met |",
        "|---|---|---|---|---|---|---:|---:|---|---|",
    ]
    for section, r in rows:
        ctl = r.get("lost_vs_control")
        met = r.get("met")
        lines.append(
            f"| {section} | {r['model']} | {r['method']} | {r['size']} | {_pm(r['test'])} | "
            f"{_pm(r['val'])} | {r['lost_vs_baseline']:+.2f} | "
            f"{'-' if ctl is None else f'{ctl:+.2f}'} | {r.get('target') or '-'} | "
            f"{'-' if met is None else ('yes' if met else '**no**')} |"
        )
    return lines


def target_lines(results: Path) -> list[str]:
    """The verdict lines ("Target ... met / MISSED") of the sections whose scripts write
    their own tables instead of protocol summary rows, quoted as they are."""
    out = []
    for name, title, _ in SECTIONS:
        md = results / f"{name}.md"
        if not md.is_file():
            continue
        for line in md.read_text().splitlines():
            low = line.lower()
            verdict = "**met**" in low or "**missed**" in low
            stated = low.startswith("target") and ("met" in low or "missed" in low)
            if not low.startswith("|") and (stated or verdict):
                out.append(f"- {title}: {line.strip()}")
    return out


def summary_figure(rows: list[tuple[str, dict]], path: Path) -> bool:
    """Points lost against the size ratio of every summary row (one PNG), or False when no
    row states a ratio."""
    pts = []
    for _, r in rows:
        head = str(r.get("size", "")).split("x")[0].replace(",", "")
        try:
            pts.append((float(head), r["lost_vs_baseline"], f"{r['model']}: {r['method']}", r))
        except ValueError:
            continue
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for ratio, lost, label, r in pts:
        ax.scatter(ratio, lost, color="tab:green" if r.get("met") else "tab:red", zorder=3)
        ax.annotate(label, (ratio, lost), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="0.5 points lost")
    ax.set_xscale("log")
    xs = [p[0] for p in pts]
    ax.set_xlim(min(xs) / 1.3, max(xs) * 3)  # room for the labels
    ax.set_xlabel("size ratio (x smaller / x fewer nonzeros)")
    ax.set_ylabel("test points lost vs baseline (mean)")
    ax.set_title("Summary rows: green = target met, red = missed")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def section_compute(d: dict) -> float | None:
    """Seconds of compute a section's JSON records: the script's own total (compute_s; None when
    it could not measure it, e.g. a resumed run), else, for a section merged from parts written
    by several runs (amc.py, early_exit.py with early_exit_joint.py), the sum of the parts' run
    times, else the wall time of the run that wrote it."""
    if "compute_s" in d:
        return d["compute_s"]
    parts = d.get("parts")
    if isinstance(parts, dict) and parts and all("wall_s" in p for p in parts.values()):
        return sum(p["wall_s"] for p in parts.values())
    return d.get("run_wall_s") or None


def build(results: Path, out: Path) -> str:
    figure = results / "summary.png"
    data = {}
    for name, _, _ in SECTIONS:
        f = results / f"{name}.json"
        if f.is_file():
            data[name] = json.loads(f.read_text())
    # protocol rows only (summary_row in _common.py); some scripts keep their own "summary"
    summary = [
        (name, r)
        for name, d in data.items()
        for r in d.get("summary", [])
        if isinstance(r, dict) and "lost_vs_baseline" in r
    ]
    compute = {name: section_compute(d) for name, d in data.items()}
    known = sum(v for v in compute.values() if v)
    missing = [n for n, _, _ in SECTIONS if not compute.get(n)]
    parts = [
        "# Benchmark results\n",
        "Protocol (benchmarks/README.md): every choice is made on the held-out split (5k images "
        "carved from the training set); the test split (10k) is evaluated once per reported row "
        "and seed, and both are recorded. Headline rows are mean ± std over the seeds of the "
        "compression on the same baseline (n = seeds; rows with one seed say '1 seed'); a target "
        "counts as met only if the mean meets it. 'Lost vs dense control' compares with the "
        "baseline fine-tuned with the same extra budget (epochs, lr schedule, distillation, "
        "augmentation) as the compressed model.\n",
        "## Summary\n",
        *summary_table(summary),
        "",
        *(
            [f"![summary]({figure.relative_to(out.parent).as_posix()})\n"]
            if summary_figure(summary, figure)
            else []
        ),
        "Verdicts stated by the other sections (their tables are below):\n",
        *target_lines(results),
        "",
        f"`make bench` (every command below, in order, then this page): about {_hours(known)} "
        "of compute on this machine, the sum of the measured compute times of the sections "
        "(a script's own total, else the sum of its parts' recorded run times, else the wall "
        "time of the run that wrote the section)"
        + (f" (not measured: {', '.join(missing)})" if missing else "")
        + ": "
        + ", ".join(f"{n} {_hours(v)}" for n, v in compute.items() if v)
        + ". Measured on 2 shared cores, one thread per job, with other jobs running: an idle "
        "machine is faster.\n",
    ]
    for name, title, cmd in SECTIONS:
        parts.append(f"## {title}\n")
        parts.append(f"Published command (from benchmarks/): `{cmd}`\n")
        md = results / f"{name}.md"
        if name not in data or not md.is_file():
            parts.append(f"_Not measured yet: run `cd benchmarks && {cmd}`._\n")
            continue
        if data[name].get("command") != cmd:
            parts.append(
                f"**Note: this section was produced by `{data[name].get('command')}`, not the "
                "published command.**\n"
            )
        if data[name].get("smoke"):
            parts.append("**Note: a --smoke run (tiny synthetic data): not a result.**\n")
        parts.append(md.read_text().strip() + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=None, help="default: results/")
    ap.add_argument("--out", type=Path, default=None, help="default: RESULTS.md")
    ap.add_argument("--commands", action="store_true", help="print the published commands")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="assemble a smoke tree (default out/smoke/results) into its RESULTS.md",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.results_dir = (args.results_dir or ROOT / "out" / "smoke") / "results"
        args.out = args.out or args.results_dir.parent / "RESULTS.md"
    args.results_dir = args.results_dir or ROOT / "results"
    args.out = args.out or ROOT / "RESULTS.md"
    if args.commands:
        print("\n".join(published_commands()))
        return
    text = build(args.results_dir, args.out)
    from nncompress.engine import atomic_write

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda p: p.write_text(text))


if __name__ == "__main__":
    main()
