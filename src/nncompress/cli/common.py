"""Shared CLI helpers: progress bars, data loading from a checkpoint's sidecar, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..core.progress import ProgressEvent

console = Console(stderr=True)
out = Console()


class RichProgress:
    """Turns :class:`ProgressEvent` callbacks into rich progress bars (one per running task)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        if not self.enabled:
            return
        if ev.kind == "start":
            if self._bar is None:
                self._bar = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                )
                self._bar.start()
            self._tasks[ev.task] = self._bar.add_task(ev.task, total=ev.total, info="")
        elif ev.kind == "advance" and self._bar is not None and ev.task in self._tasks:
            info = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.info.items()
            )
            self._bar.update(
                self._tasks[ev.task], completed=ev.completed, total=ev.total, info=info
            )
        elif ev.kind == "end" and self._bar is not None and ev.task in self._tasks:
            self._bar.remove_task(self._tasks.pop(ev.task))
            if not self._tasks:
                self._bar.stop()
                self._bar = None


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the dataset's IDX files (default: $NNCOMPRESS_DATA, then "
        "Debian's /usr/share/datasets/fashion-mnist)",
    )


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of a table"
    )


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="hide progress bars")


def dataset_for(sidecar: dict, data_dir: str | None):
    """Load the dataset a checkpoint was trained on (named in its sidecar)."""
    from ..data import load_dataset

    ds = sidecar.get("dataset") or {}
    name = ds.get("name")
    if not name:
        raise SystemExit(
            "error: the checkpoint does not record its dataset; it cannot be evaluated"
        )
    return load_dataset(name, data_dir)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right" if h not in ("layer", "type", "name") else "left")
    for r in rows:
        table.add_row(
            *[
                f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)
                for v in r
            ]
        )
    out.print(table)


def checkpoint_out(value: str) -> Path:
    """argparse type of ``--out`` checkpoint paths: checked at parse time, before any work."""
    path = Path(value)
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"'{value}' must end in .safetensors")
    return path


def existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file '{value}' does not exist")
    return path


class CheckpointJob:
    """The load -> transform -> save flow the checkpoint commands share: open the checkpoint
    and the dataset it names, build the stage context and the base training config from its
    sidecar, evaluate, and save the result with the sidecar's history carried over."""

    def __init__(self, args: argparse.Namespace, *, bars: bool | None = None) -> None:
        from ..engine import load_checkpoint

        self.path = Path(args.checkpoint)
        self.model, self.sidecar = load_checkpoint(self.path)
        self._data_dir = getattr(args, "data_dir", None)
        self._splits = None
        show = not getattr(args, "quiet", False) if bars is None else bars
        self.progress = RichProgress(show)

    @property
    def splits(self):
        """The dataset the checkpoint names, loaded on first use (so checks of the model, such
        as layer selections, fail before the data is read)."""
        if self._splits is None:
            self._splits = dataset_for(self.sidecar, self._data_dir)
        return self._splits

    @splits.setter
    def splits(self, value) -> None:
        self._splits = value

    @property
    def architecture(self) -> dict:
        return self.sidecar.get("architecture") or {}

    def train_config(self, **changes: Any):
        """The checkpoint's training config (fields this version knows), with ``changes``
        (``None`` values are ignored)."""
        from ..engine import TrainConfig

        saved = (self.sidecar.get("extra") or {}).get("train_config") or {}
        known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
        return TrainConfig(**known).replace(**{k: v for k, v in changes.items() if v is not None})

    def context(self, out_dir: Path, train_config=None):
        """The :class:`~nncompress.stages.base.StageContext` a stage runs in."""
        from ..stages.base import StageContext

        return StageContext(
            model=self.model,
            splits=self.splits,
            model_name=self.architecture.get("model"),
            model_kwargs=self.architecture.get("kwargs") or {},
            train_config=train_config or self.train_config(),
            out_dir=out_dir,
            progress=self.progress,
        )

    def accuracy(self, model=None, split: str = "test", batch: int = 512) -> float:
        from ..engine import evaluate

        loader = self.splits.loader(split, batch)
        return evaluate(self.model if model is None else model, loader, progress=self.progress)[
            "accuracy"
        ]

    def extra(self, key: str, value: Any) -> dict:
        """The sidecar's ``extra`` with ``value`` under ``key``."""
        out = dict(self.sidecar.get("extra") or {})
        out[key] = value
        return out

    def save(self, model, path: Path, metrics: dict, extra: dict) -> Path:
        """Save ``model`` (parametrizations folded) with this checkpoint's architecture,
        dataset and history."""
        from ..engine import save_checkpoint

        return save_checkpoint(
            model,
            path,
            model_name=self.architecture.get("model"),
            model_kwargs=self.architecture.get("kwargs") or {},
            dataset=self.splits.describe(),
            metrics=metrics,
            history=list(self.sidecar.get("history") or []),
            extra=extra,
        )


# commands whose --out is a folder (every other --out is a file)
DIR_OUTPUTS = ("run", "sensitivity", "demo", "search", "compress")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks every command gets before it does any work: no NaN / infinite number in any
    option (``--lr inf``), an ``--out`` that can be written (a folder for the commands of
    :data:`DIR_OUTPUTS`, a file otherwise, and a checkpoint's sidecar beside it), and
    ``args._given``: the options given with a value other than their default (for
    :func:`refuse_inapplicable`). Raises :class:`ConfigError` naming the option."""
    import math

    from ..core.errors import ConfigError
    from ..core.files import output_problem

    given, flags = set(), {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        value = getattr(args, action.dest, None)
        flag = max(action.option_strings, key=len)
        flags[action.dest] = flag
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{flag}={v}: must be a finite number")
        if value != action.default:
            given.add(action.dest)
    args._given, args._flags = given, flags
    out_path = getattr(args, "out", None)
    if out_path is not None:
        kind = "dir" if args.command in DIR_OUTPUTS else "file"
        problem = output_problem(out_path, kind)
        if problem is None and kind == "file" and Path(out_path).suffix == ".safetensors":
            problem = output_problem(Path(out_path).with_suffix(".json"), "file")
        if problem:
            raise ConfigError(f"--out={str(out_path)!r}: {problem}")


def refuse_inapplicable(args: argparse.Namespace, rules: dict[str, tuple[bool, str]]) -> None:
    """Refuse an option given (not left at its default) that does nothing in this call.

    ``rules`` maps an option's dest to ``(applies, when)``: an option that does not apply is
    an error naming it, its value and ``when`` it applies (``--qat-epochs=3: only with
    --method qat``), instead of being silently ignored."""
    from ..core.errors import ConfigError

    given = getattr(args, "_given", set())
    for dest, (applies, when) in rules.items():
        if dest in given and not applies:
            flag = getattr(args, "_flags", {}).get(dest, "--" + dest.replace("_", "-"))
            value = getattr(args, dest)
            shown = "" if isinstance(value, bool) else f"={value}"
            raise ConfigError(f"{flag}{shown}: does not apply here; {when}")
