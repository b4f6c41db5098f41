"""Recipe report: the final report (of the decoded file when the recipe encodes) and its
markdown form with the per-layer table of Deep Compression Tables 2-3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.train import evaluate

__all__ = [
    "at_chance",
    "chance_warnings",
    "final_report",
    "layer_table_markdown",
    "report_markdown",
]


def final_report(recipe, run, ctx, test_loader) -> dict[str, Any]:
    """The run's report: baseline and final accuracy, sizes, the stages' entries and, when
    the recipe encodes, the accuracy of the decoded ``model.ncz`` and its per-layer table."""
    last_acc = run.finished[-1]["accuracy"] if run.finished else None
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "model": ctx.model_name,
        "dataset": ctx.splits.name,
        "baseline_accuracy": run.baseline_accuracy,
        "final_accuracy": last_acc,
        "final_accuracy_source": "model in memory after the last stage",
        "original_bytes": run.original_bytes,
        "compressed_bytes": None,
        "compression_ratio": None,
        "stages": run.finished,
        "layers": [],
    }
    ncz = ctx.artifacts.get("ncz")
    if ncz is not None and Path(ncz).is_file():
        from ..stages.encode import decode_to_model, layer_table

        decoded = decode_to_model(Path(ncz))
        report["final_accuracy"] = evaluate(decoded, test_loader)["accuracy"]
        report["final_accuracy_source"] = f"decoded {Path(ncz).name}"
        size = Path(ncz).stat().st_size
        report["compressed_bytes"] = size
        if run.original_bytes:
            report["compression_ratio"] = run.original_bytes / size
        encode_entry = next((e for e in run.finished if e["name"] == "encode"), None)
        if encode_entry is not None:
            report["layers"] = layer_table(encode_entry["report"])
    if report["baseline_accuracy"] is not None and report["final_accuracy"] is not None:
        report["accuracy_drop"] = report["baseline_accuracy"] - report["final_accuracy"]
    report["warnings"] = chance_warnings(report, ctx.splits.num_classes)
    return report


def at_chance(accuracy: float | None, num_classes: int) -> bool:
    """Whether a test accuracy (%) is at chance level: within 20% of 100 / classes (12% for
    ten classes), what a model that learned nothing scores."""
    return accuracy is not None and accuracy <= 1.2 * 100.0 / max(1, num_classes)


def chance_warnings(report: dict[str, Any], num_classes: int) -> list[str]:
    """Loud warnings for a report whose final (or baseline) accuracy is at chance level: its
    compression ratio describes a model that learned nothing."""
    out = []
    chance = 100.0 / max(1, num_classes)
    for key, what in (("final_accuracy", "final"), ("baseline_accuracy", "baseline")):
        acc = report.get(key)
        if at_chance(acc, num_classes):
            out.append(
                f"the {what} accuracy {acc:.2f}% is at chance level ({chance:.1f}% for "
                f"{num_classes} classes): the model learned nothing and the sizes above "
                "describe a useless model; check the learning rate, epochs and data"
            )
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def report_markdown(report: dict[str, Any]) -> str:
    """The run report as markdown: summary, stages, and the per-layer table of Deep Compression
    Tables 2-3 (weights kept, weight bits and index bits after P+Q and after H, compression)."""
    lines = [f"# {report.get('recipe')}: {report.get('model')} on {report.get('dataset')}", ""]
    for w in report.get("warnings") or []:
        lines += [f"> **WARNING: {w}**", ""]
    ob, cb = report.get("original_bytes"), report.get("compressed_bytes")
    lines += [
        f"- baseline accuracy: {_fmt(report.get('baseline_accuracy'))}%",
        f"- final accuracy: {_fmt(report.get('final_accuracy'))}% "
        f"({report.get('final_accuracy_source')})",
        f"- original size (dense fp32 parameters): {_fmt(ob)} bytes",
        f"- compressed size: {_fmt(cb)} bytes",
        f"- compression ratio: {_fmt(report.get('compression_ratio'), '.1f')}x",
        "",
        "| # | stage | test acc. % | nonzeros | size (bytes) | wall (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    earlier = False
    for e in report.get("stages", []):
        mark = "" if e.get("this_run", True) else " *"
        earlier |= bool(mark)
        lines.append(
            f"| {e['index'] + 1} | {e['name']} | {_fmt(e['accuracy'])} | {e['nonzeros']:,} | "
            f"{e['size_bytes']:,}{'' if e['size_kind'] == 'file' else ' (est.)'} | "
            f"{e['wall_time_s']:.1f}{mark} |"
        )
    if earlier:
        lines += ["", "\\* run by an earlier invocation (resumed); its wall time is from then"]
    layers = report.get("layers") or []
    if layers:
        lines += ["", layer_table_markdown(layers)]
    captions = {
        "stages.png": "Test accuracy and size after every stage",
        "layers.png": "Weights kept and bits per layer",
        "sharing.png": "Weights before sharing, with the shared values (Deep Compression Fig. 5)",
    }
    figures = report.get("figures") or []
    if figures:
        lines += ["", "## Figures", ""]
        for name in figures:
            lines += [f"![{captions.get(name, name)}]({name})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def layer_table_markdown(layers: list[dict[str, Any]]) -> str:
    """Markdown of :func:`nncompress.stages.encode.layer_table` rows (Deep Compression
    Tables 2-3 layout)."""
    lines = [
        "| layer | weights | kept % | weight bits P+Q | weight bits H | index bits P+Q | "
        "index bits H | compress rate P+Q | compress rate P+Q+H |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in layers:
        lines.append(
            f"| {r['name']} | {r['params']:,} | {_fmt(r['kept_percent'], '.1f')} | "
            f"{_fmt(r['weight_bits_pq'], '.1f')} | {_fmt(r['weight_bits_h'], '.2f')} | "
            f"{_fmt(r['index_bits_pq'], '.1f')} | {_fmt(r['index_bits_h'], '.2f')} | "
            f"{_fmt(r['rate_pq'], '.1f')}x | {_fmt(r['rate_h'], '.1f')}x |"
        )
    return "\n".join(lines)
