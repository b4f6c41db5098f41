"""``nncompress run RECIPE --out DIR``: run a compression recipe end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import RichProgress, add_json_arg, add_quiet_arg, existing_file, out, print_json

__all__ = ["print_run_report", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a compression recipe (YAML) with a checkpoint after every stage",
        description="Run the stages of a recipe (train, prune, share, finetune, encode, ...). "
        "Writes DIR/stages/NN-name.safetensors after every stage, DIR/model.ncz (encode stage), "
        "DIR/report.json and DIR/report.md. Re-running with the same recipe and DIR resumes "
        "after the last finished stage.",
    )
    p.add_argument("recipe", type=existing_file, help="recipe file (.yaml)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over even if DIR holds a finished stage of this recipe",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="cap every epoch count at the recipe's quick.epochs (a fast smoke run)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only validate the recipe (every error is listed) and exit",
    )
    add_json_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_run)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}%"


def print_run_report(report: dict[str, Any]) -> None:
    """Print the stage table, the per-layer Deep Compression table and the summary."""
    from .common import print_table

    rows = [
        [
            e["index"] + 1,
            e["name"],
            _pct(e["accuracy"]),
            e["nonzeros"],
            f"{e['size_bytes']:,}" + ("" if e["size_kind"] == "file" else " (est.)"),
            f"{e['wall_time_s']:.1f}",
        ]
        for e in report["stages"]
    ]
    print_table(
        f"{report['recipe']}: stages",
        ["#", "stage", "test acc.", "nonzeros", "size bytes", "wall s"],
        rows,
    )
    if report.get("layers"):

        def f(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        print_table(
            "per layer (Deep Compression Tables 2-3 layout)",
            [
                "layer",
                "weights",
                "kept %",
                "w bits P+Q",
                "w bits H",
                "idx bits P+Q",
                "idx bits H",
                "rate P+Q",
                "rate P+Q+H",
            ],  # fmt: skip
            [
                [
                    r["name"],
                    r["params"],
                    f(r["kept_percent"], ".1f"),
                    f(r["weight_bits_pq"], ".1f"),
                    f(r["weight_bits_h"], ".2f"),
                    f(r["index_bits_pq"], ".1f"),
                    f(r["index_bits_h"], ".2f"),
                    f(r["rate_pq"], ".1f") + "x",
                    f(r["rate_h"], ".1f") + "x",
                ]
                for r in report["layers"]
            ],
        )
    ratio = report.get("compression_ratio")
    for w in report.get("warnings") or []:
        out.print(f"[bold red]WARNING: {w}[/bold red]", highlight=False)
    out.print(
        f"baseline {_pct(report['baseline_accuracy'])} -> final {_pct(report['final_accuracy'])}"
        f" ({report['final_accuracy_source']})"
    )
    if ratio:
        out.print(
            f"{report['original_bytes']:,} bytes (dense fp32) -> {report['compressed_bytes']:,} "
            f"bytes on disk: {ratio:.1f}x smaller"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe, preflight, quick_recipe, run_recipe

    recipe = load_recipe(args.recipe)  # every validation error, before any work
    if args.check:  # every check the run makes before its first stage
        preflight(quick_recipe(recipe) if args.quick else recipe, args.out, str(args.recipe))
        out.print(f"{args.recipe}: valid ({len(recipe.stages)} stages)")
        return 0
    report = run_recipe(
        recipe,
        args.out,
        progress=RichProgress(not args.quiet),
        resume=args.resume,
        quick=args.quick,
    )
    if args.json:
        print_json(report)
    else:
        print_run_report(report)
        out.print(f"report: {args.out / 'report.md'}")
    return 0
