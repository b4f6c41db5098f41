"""PNG plots of a policy search: reward over episodes, per-layer ratios of the best policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..core.files import atomic_write
from ..core.policy import Policy

__all__ = ["plot_ratios", "plot_rewards"]


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_rewards(episodes: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Reward of every episode (scan probes of the greedy agent greyed), best so far."""
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    xs = [e["episode"] for e in episodes if e["tag"] != "scan"]
    ys = [e["reward"] for e in episodes if e["tag"] != "scan"]
    scan = [(e["episode"], e["reward"]) for e in episodes if e["tag"] == "scan"]
    if scan:
        ax.scatter(*zip(*scan, strict=True), s=6, color="0.7", label="sensitivity probes")
    ax.scatter(xs, ys, s=8, label="candidates")
    best, run = float("-inf"), []
    for y in ys:
        best = max(best, y)
        run.append(best)
    if xs:
        ax.plot(xs, run, color="C3", label="best so far")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.set_title(title or "policy search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_ratios(policy: Policy, path: str | Path, title: str = "") -> Path:
    """Bars of the kept fraction per layer (filter groups, connections) and the bits."""
    rows: list[tuple[str, float, str]] = []
    for name, r in policy.filter.items():
        rows.append((name, 1.0 - r, "channels kept"))
    for name, s in policy.sparsity.items():
        rows.append((name, 1.0 - s, "weights kept"))
    fig = _figure(max(6.0, 0.35 * len(rows) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"channels kept": "C0", "weights kept": "C1"}
    for i, (_, v, kind) in enumerate(rows):
        ax.bar(i, v, color=colors[kind], label=kind)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r[0] for r in rows], rotation=70, fontsize=7, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction kept")
    if policy.bits:
        ax2 = ax.twinx()
        names = [r[0] for r in rows]
        pts = [
            (names.index(n) if n in names else i, b) for i, (n, b) in enumerate(policy.bits.items())
        ]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "k^", label="bits")
        ax2.set_ylabel("shared-weight bits")
        ax2.set_ylim(0, 9)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper right")
    ax.set_title(title or "per-layer ratios of the best policy")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
