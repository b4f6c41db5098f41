"""``nncompress run RECIPE --out DIR``: run a compression recipe end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    RichProgress,
    add_json_arg,
    add_quiet_arg,
    console,
    existing_file,
    out,
    print_json,
)

__all__ = ["announce", "interrupt_text", "print_run_report", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a compression recipe (YAML) with a checkpoint after every stage",
        description="Run the stages of a recipe (train, prune, share, finetune, encode, ...). "
        "Writes DIR/stages/NN-name.safetensors after every stage, DIR/model.ncz (encode stage), "
        "DIR/report.json, DIR/report.md and figures (DIR/stages.png, layers.png, sharing.png) "
        "linked from it. Re-running with the same recipe and DIR resumes after the last "
        "finished stage (and says so); Ctrl-C keeps the finished stages.",
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


def print_run_report(report: dict[str, Any], *, quick_epochs: int | None = None) -> None:
    """Print the stage table, the per-layer Deep Compression table and the summary.

    ``quick_epochs``: the run was ``--quick`` (every epoch count capped at this); the summary
    then says that the baseline is under-trained.
    """
    from .common import print_table

    rows = [
        [
            e["index"] + 1,
            e["name"],
            _pct(e["accuracy"]),
            e["nonzeros"],
            f"{e['size_bytes']:,}" + ("" if e["size_kind"] == "file" else " (est.)"),
            f"{e['wall_time_s']:.1f}" + ("" if e.get("this_run", True) else " *"),
        ]
        for e in report["stages"]
    ]
    print_table(
        f"{report['recipe']}: stages",
        ["#", "stage", "test acc.", "nonzeros", "size bytes", "wall s"],
        rows,
    )
    if not all(e.get("this_run", True) for e in report["stages"]):
        out.print("* finished by an earlier run (resumed): its wall time is from then")
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
    trained_here = bool(report["stages"]) and report["stages"][0]["name"] == "train"
    if quick_epochs is not None and trained_here:
        out.print(
            f"note: --quick trained the baseline for only {quick_epochs} epoch(s) and the later "
            "stages train more, so the final accuracy can exceed this under-trained baseline; "
            "without --quick the recipe's full schedule runs",
            highlight=False,
        )
    if ratio:
        out.print(
            f"{report['original_bytes']:,} bytes (dense fp32) -> {report['compressed_bytes']:,} "
            f"bytes on disk: {ratio:.1f}x smaller"
        )


def announce(recipe, out_dir: Path, *, resume: bool, quick: bool) -> dict[str, Any]:
    """Say (on stderr) whether the run starts, resumes or only reports a finished run, and
    set up the Ctrl-C message; returns :func:`~nncompress.recipe.run_status`."""
    from ..recipe import run_status

    status = run_status(recipe, out_dir, quick=quick)
    n, done = status["total"], status["finished"]
    if resume and status["state"] == "resume":
        console.print(
            f"resuming {out_dir} after stage {len(done)}/{n} ({done[-1]}): stages 1-{len(done)} "
            "are not run again (--no-resume starts over)",
            highlight=False,
        )
    elif resume and status["state"] == "done":
        console.print(
            f"{out_dir} holds a finished run of this recipe: reporting it, nothing is trained "
            "(wall times are from that run; --no-resume runs it again)",
            highlight=False,
        )
    elif not resume and status["finished"]:
        console.print(
            f"--no-resume: starting over in {out_dir} ({len(done)} finished stage(s) there "
            "are replaced)",
            highlight=False,
        )
    return status


def interrupt_text(recipe, out_dir: Path, quick: bool) -> str:
    """The Ctrl-C message of a recipe run: what is saved and how to resume."""
    from ..recipe import run_status

    try:
        status = run_status(recipe, out_dir, quick=quick)
    except Exception:  # noqa: BLE001 - the message must not fail
        return f"the finished stages are saved in {out_dir}; run the same command to resume"
    done = status["finished"]
    if not done:
        return f"no stage had finished; nothing to resume in {out_dir}"
    return (
        f"{len(done)}/{status['total']} stages finished and saved in {out_dir} (last: "
        f"{done[-1]}); run the same command again to resume after stage {len(done)}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe, preflight, quick_recipe, run_recipe

    recipe = load_recipe(args.recipe)  # every validation error, before any work
    if args.check:  # every check the run makes before its first stage
        preflight(quick_recipe(recipe) if args.quick else recipe, args.out, str(args.recipe))
        out.print(f"{args.recipe}: valid ({len(recipe.stages)} stages)")
        return 0
    announce(recipe, args.out, resume=args.resume, quick=args.quick)
    args.interrupt_hint = lambda: interrupt_text(recipe, args.out, args.quick)
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
        print_run_report(report, quick_epochs=recipe.quick_epochs if args.quick else None)
        figures = ", ".join(report.get("figures") or [])
        out.print(
            f"report: {args.out / 'report.md'}" + (f" (figures: {figures})" if figures else "")
        )
    return 0
