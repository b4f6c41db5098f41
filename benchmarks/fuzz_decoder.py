"""Long fuzzing campaign of the ``.ncz`` decoder with structured mutations (issue 19).

Decodes ``--count`` mutated files (default 100,000) made by :func:`nncompress.io.fuzz.mutate`
from the valid files of :func:`nncompress.io.fuzz.fuzz_bases`: header fields set to hostile
values, stream fields rewritten, section bytes changed behind recomputed CRCs, codebooks
poisoned, sections swapped / moved / dropped / duplicated / spliced, version and count changes.
Every file must decode (tensors within ``max_bytes``) or raise ``FormatError``; every
``--memory-every``-th decode runs under ``tracemalloc`` against the memory bound
``declared bytes + 128 x file bytes + 8 MiB``. Writes ``results/fuzz_decoder.json`` and
``results/fuzz_decoder.md`` (the counts quoted in docs/format.md section 4).

Run from benchmarks/:  python fuzz_decoder.py [--smoke] [--count N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from _common import add_results_dir_arg, command, setup, write_result
    from nncompress.io.fuzz import fuzz_bases, fuzz_decoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000, help="mutated files (default 100000)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--memory-every", type=int, default=10, help="tracemalloc every k-th file")
    ap.add_argument("--smoke", action="store_true", help="300 files (seconds)")
    add_results_dir_arg(ap)
    args = ap.parse_args(argv)
    setup(args)
    count = 300 if args.smoke else args.count
    bases = fuzz_bases()
    t0 = time.perf_counter()
    last = [t0]

    def progress(i: int, n: int) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"{i}/{n} files, {last[0] - t0:.0f} s", file=sys.stderr, flush=True)

    stats = fuzz_decoder(bases, count, args.seed, memory_every=args.memory_every, progress=progress)
    wall = time.perf_counter() - t0
    result = {
        "seed": args.seed,
        "base_files": len(bases),
        "base_bytes": [len(b) for b in bases],
        "wall_time_s": wall,
        **stats.to_dict(),
    }
    print(json.dumps(result, indent=2))
    argv_ = None if argv is None else ["fuzz_decoder.py", *argv]
    write_result("fuzz_decoder", result, markdown(result, command(argv_)), argv_)
    return 1 if stats.bad else 0


def markdown(r: dict, cmd: str) -> str:
    """The results page below the header that ``write_result`` adds (command, machine)."""
    lines = [
        f"`{cmd}` (seed {r['seed']}, {r['base_files']} valid base files of "
        f"{min(r['base_bytes'])}-{max(r['base_bytes'])} bytes): **{r['files']:,} mutated files** "
        f"in {r['wall_time_s']:.0f} s.",
        "",
        f"- decoded: {r['decoded']:,}; refused with `FormatError`: "
        f"{r['refused_with_format_error']:,}; unchanged by their mutation: {r['unchanged']:,}",
        f"- any other exception: **{len(r['other_exceptions'])}**",
        f"- slowest file: {1000 * r['max_seconds_per_file']:.1f} ms",
        f"- memory checked (tracemalloc) on {r['memory_checked']:,} files; largest peak / bound "
        f"= {r['max_peak_over_bound']:.3f}",
        "",
        "| mutation | files | refused |",
        "|---|---:|---:|",
    ]
    for k, v in r["by_kind"].items():
        lines.append(f"| {k} | {v:,} | {r['refused_by_kind'].get(k, 0):,} |")
    lines += ["", "Most frequent refusals (message without numbers and names):", ""]
    lines += [f"- {k}: {v:,}" for k, v in r["top_reasons"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
