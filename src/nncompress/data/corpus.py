"""A plain-text corpus every Debian machine has: the licences in ``/usr/share/common-licenses``
and the English manual pages in ``/usr/share/man/man1`` (roff markup stripped), as characters.

Files are split between train / val / test by a hash of their name (never a file in two
splits), so held-out text is from documents the model never saw. Characters seen fewer than
``min_count`` times in the training split map to one unknown symbol.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import ConfigError

__all__ = ["CharCorpus", "debian_text", "lm_batches", "strip_roff"]

LICENSES = Path("/usr/share/common-licenses")
MAN1 = Path("/usr/share/man/man1")
_KEEP = {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "TP", "IP"}
_ESC = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\\(em|\\\(en"), "-"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\\*\(..|\\\*."), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
]


def strip_roff(text: str) -> str:
    """Plain text of a man page: drop comments and most requests, keep the text of font and
    heading macros, remove escapes."""
    out = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or parts[0] not in _KEEP or len(parts) < 2:
                continue
            line = parts[1].replace('"', "")
        for pat, rep in _ESC:
            line = pat.sub(rep, line)
        line = line.replace("\\", "")
        if line.strip():
            out.append(line.rstrip())
    return "\n".join(out)


def _split_of(name: str) -> str:
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 20
    return "test" if h == 0 else "val" if h == 1 else "train"


@dataclass
class CharCorpus:
    """Character ids per split and the vocabulary (index -> character; 0 is unknown)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    chars: list[str]
    files: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    def describe(self) -> dict:
        return {
            "name": "debian-text",
            "vocab_size": self.vocab_size,
            "chars": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "files": self.files,
        }


def debian_text(
    max_man_pages: int = 600, min_count: int = 20, max_chars_per_file: int = 40_000
) -> CharCorpus:
    """Build the corpus (see the module docstring). ``max_man_pages``: the first pages of
    ``man1`` in name order (0 for licences only)."""
    if not LICENSES.is_dir():
        raise ConfigError(f"'{LICENSES}' not found: this corpus needs a Debian-like system")
    texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    seen: set[Path] = set()
    for f in sorted(LICENSES.iterdir()):
        real = f.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        texts[_split_of(real.name)].append(real.read_text(errors="replace")[:max_chars_per_file])
    if MAN1.is_dir() and max_man_pages:
        pages = sorted(p for p in MAN1.iterdir() if p.name.endswith(".gz"))[:max_man_pages]
        for p in pages:
            try:
                raw = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            if raw.lstrip().startswith(".so "):  # a link to another page
                continue
            texts[_split_of(p.name)].append(strip_roff(raw)[:max_chars_per_file])
    joined = {k: "\n\n".join(v) for k, v in texts.items()}
    counts: dict[str, int] = {}
    for c in joined["train"]:
        counts[c] = counts.get(c, 0) + 1
    chars = ["\x00"] + sorted(c for c, n in counts.items() if n >= min_count)
    index = {c: i for i, c in enumerate(chars)}

    def enc(s: str) -> torch.Tensor:
        return torch.tensor([index.get(c, 0) for c in s], dtype=torch.long)

    return CharCorpus(
        enc(joined["train"]),
        enc(joined["val"]),
        enc(joined["test"]),
        chars,
        {k: len(v) for k, v in texts.items()},
    )


def lm_batches(
    ids: torch.Tensor,
    block: int,
    batch_size: int,
    *,
    n_batches: int | None = None,
    seed: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``{"input_ids": (B, block+1)}`` windows: random offsets when ``seed`` is given (training),
    else consecutive non-overlapping windows from the start (evaluation), ``n_batches`` of
    them (all windows when None and no seed)."""
    span = block + 1
    if len(ids) < span:
        raise ConfigError(f"text of {len(ids)} characters: shorter than one window of {span}")
    if seed is None:
        n_win = len(ids) // span
        wins = ids[: n_win * span].view(n_win, span)
        out = [{"input_ids": wins[i : i + batch_size]} for i in range(0, n_win, batch_size)]
        return out[:n_batches] if n_batches is not None else out
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches or 1):
        starts = torch.randint(0, len(ids) - span, (batch_size,), generator=g)
        out.append({"input_ids": torch.stack([ids[s : s + span] for s in starts.tolist()])})
    return out
