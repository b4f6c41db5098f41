"""Paired CPU latency of the baselines and their decomposed versions (benchmarks/out/lowrank).

Baseline and decomposed model (the first seed's checkpoint of every headline row of
lowrank.py) are timed alternately, round after round, so that the load other processes put on
the shared machine affects both alike; medians over rounds, one thread. Latency depends on the
architecture only, so one seed's checkpoint stands for all.

Run from benchmarks/ after lowrank.py:  python lowrank_latency.py [--rounds 7 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import PATHS, add_protocol_args, baseline, out_dir, setup, write_result
from nncompress.engine import load_checkpoint
from nncompress.stats import measure_latency


def checkpoints() -> list[tuple[str, str, object]]:
    """(model, row label, path) of the first seed's checkpoint of every headline row of
    lowrank.py (checkpoints of rows it no longer has, left in out/lowrank/, are not timed)."""
    from lowrank import EXPERIMENTS

    headline = {(e.model, e.label) for rows in EXPERIMENTS.values() for e in rows if e.headline}
    found = []
    for ckpt in sorted(out_dir("lowrank").glob("*.safetensors")):
        side = json.loads(ckpt.with_suffix(".json").read_text())
        extra = side.get("extra") or {}
        label = extra.get("bench_label")
        if (side["architecture"]["model"], label) not in headline:
            continue
        found.append((side["architecture"]["model"], label, extra.get("seed"), ckpt))
    first = {}
    for model, label, _seed, ckpt in sorted(found, key=lambda t: (t[0], t[1], t[2])):
        first.setdefault((model, label), ckpt)
    return [(m, lab, p) for (m, lab), p in first.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per round")
    add_protocol_args(ap, seeds="0")
    args = ap.parse_args(argv)
    setup(args)
    if args.smoke:
        args.rounds, args.repeats = 1, 1
        if not checkpoints():  # a smoke run alone: make the decomposed models first
            import lowrank

            lowrank.main(["--smoke", "--parts", "lenet300", "--results-dir",
                          str(PATHS.results.parent)])  # fmt: skip
    t0 = time.perf_counter()
    rows = []
    for name, label, ckpt in checkpoints():
        base, sidecar = load_checkpoint(baseline(name))
        dec, _ = load_checkpoint(ckpt)
        shape = tuple(sidecar["dataset"]["input_shape"])
        row = {"model": name, "method": label, "checkpoint": str(ckpt)}
        for b in (1, 64):
            tb, td = [], []
            for _ in range(args.rounds):
                tb.append(measure_latency(base, shape, b, repeats=args.repeats, warmup=2))
                td.append(measure_latency(dec, shape, b, repeats=args.repeats, warmup=2))
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
        f"Paired, alternating measurements ({args.rounds} rounds x {args.repeats} runs, "
        "medians, 1 thread) on a shared 2-core machine (other jobs may use the other core): "
        "indicative only. A ratio above 1.00x means the decomposed model is faster.",
    ]
    write_result(
        "lowrank_latency",
        {"rows": rows, "compute_s": time.perf_counter() - t0},
        "\n".join(lines),
        None if argv is None else ["lowrank_latency.py", *argv],
    )


if __name__ == "__main__":
    main()
