"""Printing what a transform changed and skipped (:class:`nncompress.core.coverage.CoverageReport`).

The library warns about low coverage with a :class:`~nncompress.core.coverage.CoverageWarning`;
on the command line that warning is printed once, by :func:`print_coverage`, in plain words.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..core.coverage import CoverageWarning
from .common import console, out

# the CLI prints the coverage warnings itself (print_coverage), not as Python warnings
warnings.filterwarnings("ignore", category=CoverageWarning)


def print_coverage(cov: dict[str, Any] | None, *, details: bool = True) -> None:
    """One summary line (layers changed, parameter share, layers skipped), one line per
    skipped layer with its reason (``details``), and the warnings on stderr."""
    if not cov:
        return
    out.print(
        f"{cov['transform']}: changed {len(cov['changed'])} layer(s) holding "
        f"{cov['params_changed']:,} of {cov['params_total']:,} parameters "
        f"({100 * cov['fraction']:.1f}%), skipped {len(cov['skipped'])}",
        highlight=False,
    )
    if details:
        for name, why in cov["skipped"].items():
            out.print(f"  skipped {name}: {why}", highlight=False)
    for w in cov.get("warnings") or []:
        console.print(f"warning: {w}", highlight=False)
