"""Figures of a recipe run, written next to ``report.md`` and linked from it (matplotlib, Agg).

- ``stages.png``: test accuracy and size (bytes, log scale) after every stage.
- ``layers.png``: per layer, the weights kept (%) and the bits per kept weight (after P+Q and
  after entropy coding when the run encodes; the shared bits otherwise).
- ``sharing.png``: for the shared layers, the histogram of the nonzero weights before weight
  sharing with the shared values marked: the centroids right after k-means and after
  fine-tuning (as Deep Compression, Han et al. 2016, Figure 5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_figures"]

log = logging.getLogger(__name__)


def _figure(rows: int, cols: int, size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    from ..core.files import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _stages_png(report: dict[str, Any], path: Path) -> Path | None:
    stages = report.get("stages") or []
    if not stages:
        return None
    fig, ax = _figure(1, 2, (10, 3.6))
    x = np.arange(len(stages))
    labels = [f"{e['index'] + 1} {e['name']}" for e in stages]
    acc = [np.nan if e["accuracy"] is None else e["accuracy"] for e in stages]
    ax[0, 0].plot(x, acc, "o-", color="tab:blue")
    if report.get("baseline_accuracy") is not None:
        ax[0, 0].axhline(report["baseline_accuracy"], ls="--", color="gray", label="baseline")
        ax[0, 0].legend(loc="lower left")
    ax[0, 0].set_ylabel("test accuracy (%)")
    ax[0, 0].set_title("accuracy after each stage")
    sizes = [e["size_bytes"] for e in stages]
    colors = ["tab:green" if e["size_kind"] == "file" else "tab:orange" for e in stages]
    ax[0, 1].bar(x, sizes, color=colors)
    if report.get("original_bytes"):
        ax[0, 1].axhline(report["original_bytes"], ls="--", color="gray", label="dense fp32")
        ax[0, 1].legend(loc="upper right")
    ax[0, 1].set_yscale("log")
    ax[0, 1].set_ylabel("bytes (orange: estimate, green: file)")
    ax[0, 1].set_title("size after each stage")
    for a in ax[0]:
        a.set_xticks(x, labels, rotation=30, ha="right")
    return _save(fig, path)


def _layer_bits(report: dict[str, Any]) -> tuple[list[str], list[float], dict[str, list]]:
    """Layer names, kept % and bits series (label -> per-layer values)."""
    rows = [r for r in report.get("layers") or [] if r["name"] != "total"]
    if rows:  # the encoded file's per-layer table (Deep Compression Tables 2-3)
        names = [r["name"] for r in rows]
        kept = [r["kept_percent"] for r in rows]
        bits = {
            "weight bits P+Q": [r["weight_bits_pq"] for r in rows],
            "weight bits H": [r["weight_bits_h"] for r in rows],
            "index bits H": [r["index_bits_h"] for r in rows],
        }
        return names, kept, bits
    shares = [e for e in report.get("stages") or [] if e["name"] == "share"]
    layers = (shares[-1]["report"].get("layers") if shares else None) or []
    names = [r["name"] for r in layers]
    kept = [100.0 * r["n_nonzero"] / max(r["n_weights"], 1) for r in layers]
    return names, kept, {"shared bits": [r["bits"] for r in layers]}


def _layers_png(report: dict[str, Any], path: Path) -> Path | None:
    names, kept, bits = _layer_bits(report)
    if not names:
        return None
    fig, ax = _figure(1, 2, (10, 3.6))
    x = np.arange(len(names))
    ax[0, 0].bar(x, kept, color="tab:blue")
    ax[0, 0].set_ylabel("weights kept (%)")
    ax[0, 0].set_title("sparsity per layer")
    width = 0.8 / len(bits)
    for i, (label, vals) in enumerate(bits.items()):
        v = [np.nan if b is None else b for b in vals]
        ax[0, 1].bar(x + (i - (len(bits) - 1) / 2) * width, v, width, label=label)
    ax[0, 1].set_ylabel("bits per kept weight")
    ax[0, 1].set_title("bits per layer")
    ax[0, 1].legend(loc="upper right", fontsize="small")
    for a in ax[0]:
        a.set_xticks(x, names, rotation=30, ha="right")
    return _save(fig, path)


def _weights(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    return {n: tensors[f"{n}.weight"].ravel() for n in names if f"{n}.weight" in tensors}


def _sharing_png(
    report: dict[str, Any], path: Path, before: Path | None, shared: Path | None, final: Path
) -> Path | None:
    shares = [e for e in report.get("stages") or [] if e["name"] == "share"]
    if not shares or before is None or shared is None or not before.is_file():
        return None
    layers = sorted(shares[-1]["report"].get("layers") or [], key=lambda r: -r["n_weights"])[:4]
    names = [r["name"] for r in layers]
    w0, w1, w2 = _weights(before, names), _weights(shared, names), _weights(final, names)
    names = [n for n in names if n in w0 and n in w1]
    if not names:
        return None
    fig, ax = _figure(1, len(names), (4.2 * len(names), 3.4))
    for a, n in zip(ax[0], names, strict=True):
        w = w0[n][w0[n] != 0]
        a.hist(w, bins=120, color="tab:blue", alpha=0.8, label="before sharing")
        top = a.get_ylim()[1]
        c1 = np.unique(w1[n][w1[n] != 0])
        a.vlines(c1, 0, 0.35 * top, color="tab:red", lw=1, label=f"centroids ({c1.size})")
        if n in w2 and final != shared:
            c2 = np.unique(w2[n][w2[n] != 0])
            a.plot(c2, np.full(c2.size, 0.4 * top), "v", color="black", ms=3, label="fine-tuned")
        a.set_title(f"{n}: {w.size:,} nonzero weights")
        a.set_xlabel("weight value")
        a.legend(loc="upper right", fontsize="x-small")
    ax[0, 0].set_ylabel("count")
    return _save(fig, path)


def write_figures(
    report: dict[str, Any], out_dir: Path, *, before_share: Path | None = None
) -> list[str]:
    """Write the run's PNGs into ``out_dir``; returns their file names. ``before_share`` is the
    checkpoint the share stage started from (a stage checkpoint or the baseline)."""
    out_dir = Path(out_dir)
    stages = report.get("stages") or []
    shares = [e for e in stages if e["name"] == "share"]
    shared = out_dir / shares[-1]["checkpoint"] if shares else None
    final = out_dir / stages[-1]["checkpoint"] if stages else None
    written = []
    for make in (
        lambda: _stages_png(report, out_dir / "stages.png"),
        lambda: _layers_png(report, out_dir / "layers.png"),
        lambda: _sharing_png(report, out_dir / "sharing.png", before_share, shared, final),
    ):
        try:
            made = make()
        except (OSError, ValueError, KeyError) as exc:  # a figure never fails a finished run
            log.warning("figure not written: %s", exc)
            continue
        if made is not None:
            written.append(made.name)
    return written
