"""The ``nncompress`` command line. Each command group lives in its own module and registers
its sub-commands through ``register(subparsers)``; this file only lists them and adds the
options every command shares (``--threads``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

# Explicit registry of command modules (no discovery by name lookup).
COMMAND_MODULES = [
    "nncompress.cli.basic",
    "nncompress.cli.codec",
    "nncompress.cli.conditional",
    "nncompress.cli.distill",
    "nncompress.cli.filters",
    "nncompress.cli.hf",
    "nncompress.cli.lowrank",
    "nncompress.cli.prune",
    "nncompress.cli.quant",
    "nncompress.cli.run",
    "nncompress.cli.search",
    "nncompress.cli.share",
]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: nncompress prune: argument --q: invalid float
    value: 'x'`` and exit code 2 (no usage block, no traceback)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .common import HelpFormatter, add_threads_arg

    parser = _Parser(
        prog="nncompress",
        description="Compress trained PyTorch networks: pruning, weight sharing, quantization, "
        "low-rank decomposition, distillation and entropy-coded storage. Every command takes "
        "--threads (default: auto, see 'nncompress train --help').",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nncompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    seen: set[int] = set()
    for p in sub.choices.values():  # every command: --threads, defaults shown in --help
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.formatter_class = HelpFormatter
        if "--threads" not in p._option_string_actions:
            add_threads_arg(p)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)  # pragma: no cover - the parser always has its sub-commands


def main(argv: list[str] | None = None) -> int:
    from rich.markup import escape

    from .common import console

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        from .common import apply_threads, check_arguments

        check_arguments(_subparser(parser, args.command), args)  # before any work
        args.threads = apply_threads(args.threads)
        return int(args.func(args) or 0)
    # every nncompress input error (ConfigError, CheckpointError, DataError, FormatError,
    # TrainingError...) is a ValueError; OSError: a file that could not be read or written
    except (ValueError, OSError) as exc:
        text = str(exc) if not isinstance(exc, OSError) or str(exc) else type(exc).__name__
        # escape: messages name extras such as 'nncompress[policy]', which rich reads as markup
        console.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a message, no traceback
        hint = getattr(args, "interrupt_hint", None)
        text = hint() if callable(hint) else "nothing was written for the unfinished step"
        console.print(f"interrupted: {text}", highlight=False, soft_wrap=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
