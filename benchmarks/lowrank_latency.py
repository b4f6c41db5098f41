"""Paired CPU latency of the baselines and their decomposed versions (benchmarks/out/lowrank).

Baseline and decomposed model are timed alternately, round after round, so that the load other
processes put on the shared machine affects both alike; medians over rounds, one thread.
Run from benchmarks/ after lowrank.py:  ../.venv/bin/python lowrank_latency.py
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from _common import baseline, write_result
from nncompress.engine import load_checkpoint
from nncompress.stats import measure_latency

OUT = Path(__file__).resolve().parent / "out" / "lowrank"


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for ckpt in sorted(OUT.glob("*.safetensors")):
        name, method = ckpt.stem.rsplit("-", 1)
        base, sidecar = load_checkpoint(baseline(name))
        dec, _ = load_checkpoint(ckpt)
        shape = tuple(sidecar["dataset"]["input_shape"])
        row = {"model": name, "method": method}
        for b in (1, 64):
            tb, td = [], []
            for _ in range(7):
                tb.append(measure_latency(base, shape, b, repeats=5, warmup=2))
                td.append(measure_latency(dec, shape, b, repeats=5, warmup=2))
            row[f"base_b{b}"], row[f"dec_b{b}"] = statistics.median(tb), statistics.median(td)
        rows.append(row)
    lines = [
        "| model | method | batch 1 ms (base -> decomposed) | batch 64 ms (base -> decomposed) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['base_b1']:.3f} -> {r['dec_b1']:.3f} "
            f"({r['base_b1'] / r['dec_b1']:.2f}x) | {r['base_b64']:.2f} -> {r['dec_b64']:.2f} "
            f"({r['base_b64'] / r['dec_b64']:.2f}x) |"
        )
    lines += [
        "",
        "Paired, alternating measurements (7 rounds x 5 runs, medians, 1 thread) on a shared "
        "2-core machine (other jobs may use the other core): indicative only.",
    ]
    write_result("lowrank_latency", {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
