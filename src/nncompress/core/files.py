"""Atomic files: a reader sees the old file or the complete new one, never a torn write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "output_problem"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    Either the complete new file appears or the old one is left untouched. The new file gets
    the permissions of an ordinary new file (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> None:
    """Write ``json.dumps(obj, **dumps)`` to ``path`` atomically (the text is built first, so
    an object that cannot be serialised leaves the old file alone)."""
    atomic_write_text(path, json.dumps(obj, **dumps))


def output_problem(path: str | Path, kind: str = "file") -> str | None:
    """Why ``path`` cannot be written as a ``kind`` ('file' or 'dir'), or ``None`` if it can.

    Checked before any work starts, so a bad output location fails in a second, not after
    training: a file where a folder is needed (or the reverse), a parent that is a file, and a
    folder nothing can be written into (probed by creating and removing a temporary file in
    the nearest existing folder, which also catches read-only file systems and works for
    root, whom permission bits do not stop). Nothing is left behind.
    """
    p = Path(path)
    if kind == "file" and p.is_dir():
        return f"'{p}' is a folder; give a file name"
    if kind == "dir" and p.exists() and not p.is_dir():
        return f"'{p}' is a file; give a folder"
    anc = p if kind == "dir" else p.parent
    anc = anc if str(anc) else Path(".")
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"'{anc}' is a file, so '{p}' cannot be created below it"
    try:
        fd, probe = tempfile.mkstemp(prefix=".nncompress-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write into folder '{anc}' ({exc.strerror or exc})"
    if kind == "file" and p.exists() and not os.access(p, os.W_OK):
        return f"'{p}' exists and is not writable"
    return None
