"""The ``nncompress`` command line. Each command group lives in its own module and registers
its sub-commands through ``register(subparsers)``; this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Explicit registry of command modules (no discovery by name lookup).
COMMAND_MODULES = [
    "nncompress.cli.basic",
    "nncompress.cli.codec",
    "nncompress.cli.distill",
    "nncompress.cli.filters",
    "nncompress.cli.hf",
    "nncompress.cli.lowrank",
    "nncompress.cli.prune",
    "nncompress.cli.quant",
    "nncompress.cli.run",
    "nncompress.cli.search",
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="nncompress",
        description="Compress trained PyTorch networks: pruning, weight sharing, quantization, "
        "low-rank decomposition, distillation and entropy-coded storage.",
    )
    parser.add_argument("--version", action="version", version=f"nncompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    # every nncompress input error (ConfigError, CheckpointError, DataError, FormatError...)
    # is a ValueError
    except (ValueError, FileNotFoundError) as exc:
        from .common import console

        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
