"""Reading ``.ncz`` files: every length, count and shape is validated against the remaining
bytes and the caller's limits (``max_elements``, ``max_bytes``) before anything is allocated,
each section's CRC32 is checked, streams are decoded in chunks straight into the output (so
decoding allocates the declared tensors plus O(file size)), and any damage raises
:class:`~nncompress.io.FormatError` (never another exception)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .decode_checks import _ENTRY_CHECKS as _ENTRY_CHECKS
from .decode_checks import _check_header as _check_header
from .decode_schemes import _DECODERS as _DECODERS
from .decode_schemes import decode_entry as decode_entry
from .errors import FormatError
from .format import (
    _FRAME,
    _PREFIX,
    BOUND_CRC_MINOR,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ELEMENTS,
    SCHEME_MINOR,
    _fail,
    _inflate,
    _split_sections,
    alias_report,
    needed_minor,
)
from .report import EncodeReport

__all__ = [
    "decode_bytes",
    "decode_entry",
    "decode_file",
    "inspect_bytes",
    "inspect_file",
    "load_compressed",
]


def _check_limits(max_elements: Any, max_bytes: Any) -> None:
    for name, v in (("max_elements", max_elements), ("max_bytes", max_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}={v!r}: must be an integer >= 0")


def _decode(
    data: bytes | memoryview, *, max_elements: int, max_bytes: int, with_report: bool
) -> tuple[dict[str, torch.Tensor], Any, EncodeReport | None]:
    _check_limits(max_elements, max_bytes)
    try:
        with np.errstate(all="ignore"):  # damaged codebooks may hold NaN/inf: not an error here
            return _decode_checked(
                data, max_elements=max_elements, max_bytes=max_bytes, with_report=with_report
            )
    except FormatError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError as exc:
        raise FormatError(f"file declares sizes too large to decode: {exc}") from exc
    except Exception as exc:  # safety net: any other failure on damaged input is a FormatError
        raise FormatError(f"malformed .ncz file: {type(exc).__name__}: {exc}") from exc


def _check_minor(minor: int, entries: list[dict]) -> None:
    """The minor version is exactly the one a writer puts there (like ZIP's "version needed to
    extract"): for 1.0 / 1.1 files what their schemes need (1.1 exactly when a tensor uses the
    pq scheme); from 1.2 on (CRCs bound to section indices) 1.2, or 1.3 when a tensor uses a
    scheme or dtype of 1.3 (:func:`~.format.written_minor`). A damaged version field is refused
    in either direction."""
    needed = needed_minor(entries)
    expect = needed if minor < BOUND_CRC_MINOR else max(BOUND_CRC_MINOR, needed)
    if minor != expect:
        raise _fail(
            f"format version 1.{minor} does not match the file's contents, which need 1.{needed} "
            f"(a scheme needs the version that added it: {SCHEME_MINOR}; files before "
            f"1.{BOUND_CRC_MINOR} carry exactly the version their schemes need, later ones "
            f"1.{BOUND_CRC_MINOR} or the version their schemes need if newer)"
        )


def _decode_checked(
    data: bytes | memoryview, *, max_elements: int, max_bytes: int, with_report: bool
) -> tuple[dict[str, torch.Tensor], Any, EncodeReport | None]:
    secs, minor = _split_sections(data)
    header = _inflate(secs[0], "header")
    metadata = _inflate(secs[1], "metadata")
    entries = _check_header(header, len(secs), max_elements, len(data), max_bytes)
    _check_minor(minor, entries)
    state: dict[str, torch.Tensor] = {}
    reports = []
    for e in entries:
        if e["scheme"] == "alias":  # stored once: a copy of the earlier tensor
            t = state[e["of"]].clone()
            rep = alias_report(e["name"], t) if with_report else None
        else:
            t, rep = decode_entry(e, secs, with_report=with_report)
        state[e["name"]] = t
        reports.append(rep)
    report = None
    if with_report:
        report = EncodeReport(
            tensors=tuple(reports),
            prefix_bytes=_PREFIX.size,
            header_bytes=len(secs[0]) + _FRAME.size,
            metadata_bytes=len(secs[1]) + _FRAME.size,
            total_bytes=len(data),
        )
    return state, metadata, report


def decode_bytes(
    data: bytes | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Decode ``.ncz`` bytes: ``(state_dict, metadata)``; :class:`FormatError` if damaged.

    ``max_elements`` and ``max_bytes`` bound the tensor elements and decoded bytes the file
    may declare; both are checked before anything is allocated, and decoding allocates the
    declared tensors plus ``O(file size)`` (streams are decoded in chunks).
    """
    state, metadata, _ = _decode(
        data, max_elements=max_elements, max_bytes=max_bytes, with_report=False
    )
    return state, metadata


def _read(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed file '{path}' does not exist")
    return path.read_bytes()


def decode_file(
    path: str | Path,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read and decode a ``.ncz`` file: ``(state_dict, metadata)``.

    ``max_elements`` (default 2**28) and ``max_bytes`` (default 2 GiB) bound what the file may
    declare: the total number of tensor elements and of decoded bytes (raise them for larger
    models). A file declaring more is refused before anything is allocated.
    """
    try:
        return decode_bytes(_read(path), max_elements=max_elements, max_bytes=max_bytes)
    except FormatError as exc:
        raise FormatError(f"'{path}': {exc}") from exc


def inspect_bytes(
    data: bytes | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
):
    """Itemised :class:`EncodeReport` of ``.ncz`` bytes (decodes every stream)."""
    _, _, report = _decode(data, max_elements=max_elements, max_bytes=max_bytes, with_report=True)
    return report


def inspect_file(
    path: str | Path,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> EncodeReport:
    """Itemised :class:`EncodeReport` of a ``.ncz`` file: per-tensor scheme, codebook, code
    and index bits (fixed "P+Q" and coded), fillers, entropies, and totals."""
    try:
        return inspect_bytes(_read(path), max_elements=max_elements, max_bytes=max_bytes)
    except FormatError as exc:
        raise FormatError(f"'{path}': {exc}") from exc


def load_compressed(model: nn.Module, path: str | Path, **limits: int) -> Any:
    """Fill ``model`` (strictly, by name) from a ``.ncz`` file; returns the file's metadata.
    ``limits``: ``max_elements`` / ``max_bytes`` of :func:`decode_file`."""
    state, metadata = decode_file(path, **limits)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"'{path}': the decoded tensors do not fit the model: {exc}") from exc
    return metadata
