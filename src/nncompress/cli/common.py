"""Shared CLI helpers: threads, progress (bars on a terminal, one line per epoch/stage in a
log), tables (full markdown when stdout is not a terminal), opening models from checkpoints
and ``.ncz`` files (``--model-factory`` for custom architectures), JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
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

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)  # never wrap or cut a line of numbers (logs, pipes)


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with every option's default: appended as ``(default: X)`` unless the help
    already names it (or the option is a flag / has no default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if (
            "default" in text
            or d is None
            or isinstance(d, bool)
            or d == argparse.SUPPRESS
            or (isinstance(d, list | tuple) and not d)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


# ------------------------------------------------------------------------------------ threads


def auto_threads() -> int:
    """The ``--threads auto`` value: ``$OMP_NUM_THREADS`` if set, else the CPUs this process
    may use minus the 1-minute load average (at least 1, at most 8).

    Measured on a 2-core machine under load (issue 13): one LeNet-300-100 epoch took 84 s with
    torch's default of 2 threads and 4 s with 1; intra-op threads that wait for busy cores spin
    instead of computing. Small models gain little from more threads, so idle cores only.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(8, cpus - round(load)))


def threads_arg(value: str) -> int | str:
    """argparse type of ``--threads``: a positive integer or 'auto'."""
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"--threads={value!r}: must be 'auto' or an integer >= 1")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=threads_arg,
        default="auto",
        help="CPU threads for PyTorch (and onnxruntime): N, or auto = $OMP_NUM_THREADS if "
        "set, else the idle CPUs (CPUs minus the load average, 1 to 8) (default: auto)",
    )


def apply_threads(value: int | str) -> int:
    """Set PyTorch's intra-op (and, once per process, inter-op) threads; returns the count."""
    import torch

    n = auto_threads() if value == "auto" else int(value)
    torch.set_num_threads(n)
    logging.getLogger("nncompress.cli").info(
        "threads: %d%s", n, " (auto)" if value == "auto" else ""
    )
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process (tests calling main() twice)
        pass
    return n


class RichProgress:
    """Turns :class:`ProgressEvent` callbacks into rich progress bars on a terminal (one per
    running task); when stderr is not a terminal (a log file, CI, a pipe), prints one plain line
    per finished epoch, per recipe stage and per task that took more than 2 s instead."""

    LINE_MIN_S = 2.0

    def __init__(self, enabled: bool = True, *, lines: bool | None = None) -> None:
        self.enabled = enabled
        self.lines = (not console.is_terminal) if lines is None else lines
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._started: dict[str, tuple[float, int | None]] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        if not self.enabled:
            return
        if self.lines:
            self._line(ev)
        else:
            self._draw(ev)

    # -- logs and pipes: one line per epoch / stage / long task
    def _line(self, ev: ProgressEvent) -> None:
        if ev.kind == "start":
            self._started[ev.task] = (time.perf_counter(), ev.total)
            return
        t0, total = self._started.get(ev.task, (time.perf_counter(), ev.total))
        if ev.kind == "advance":
            if ev.info.get("epoch_done"):
                info = {k: v for k, v in ev.info.items() if k not in ("epoch_done", "epoch")}
                epochs = ev.info.get("epochs")
                of = f"/{epochs}" if epochs else ""
                info.pop("epochs", None)
                console.print(
                    f"{ev.task}: epoch {ev.info.get('epoch')}{of}  {_info_text(info)}  "
                    f"({time.perf_counter() - t0:.1f} s)",
                    highlight=False,
                )
            elif ev.task == "recipe" and "stage" in ev.info:
                console.print(
                    f"stage {ev.completed + 1}/{ev.total}: {ev.info['stage']}", highlight=False
                )
            return
        self._started.pop(ev.task, None)
        wall = time.perf_counter() - t0
        if wall >= self.LINE_MIN_S and ev.task not in ("train", "recipe"):
            done = f" ({total} steps)" if total else ""
            console.print(f"{ev.task}: done{done} in {wall:.1f} s", highlight=False)

    # -- terminals: bars
    def _draw(self, ev: ProgressEvent) -> None:
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
            info = {k: v for k, v in ev.info.items() if k not in ("epoch_done", "epochs")}
            self._bar.update(
                self._tasks[ev.task], completed=ev.completed, total=ev.total, info=_info_text(info)
            )
        elif ev.kind == "end" and self._bar is not None and ev.task in self._tasks:
            self._bar.remove_task(self._tasks.pop(ev.task))
            if not self._tasks:
                self._bar.stop()
                self._bar = None


def _info_text(info: dict) -> str:
    return "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
    )


DATASETS = ("fashion-mnist", "mnist", "digits", "synthetic")


def add_data_args(p: argparse.ArgumentParser, *, fallback: bool = True) -> None:
    """``--data-dir``, and (``fallback``) ``--dataset`` for model files that record none."""
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the dataset's IDX files (default: $NNCOMPRESS_DATA, then "
        "Debian's /usr/share/datasets/fashion-mnist)",
    )
    if fallback:
        p.add_argument(
            "--dataset",
            choices=DATASETS,
            default=None,
            help="dataset of a model file that does not record one (a .ncz saved from Python "
            "with save_compressed); a file's recorded dataset always wins",
        )


MODEL_HELP = "model: a checkpoint (.safetensors + .json sidecar) or a compressed file (.ncz)"


def add_model_arg(p: argparse.ArgumentParser, dest: str = "checkpoint", help: str = MODEL_HELP):
    """The positional model file and ``--model-factory`` (custom architectures)."""
    p.add_argument(dest, type=existing_file, help=help)
    add_factory_arg(p)


def add_factory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-factory",
        metavar="MODULE:FUNCTION",
        default=None,
        help="for a model that is not in 'nncompress models': an importable function "
        "returning a freshly built instance of its architecture, e.g. mynets:make_net "
        "(mynets.py in the current folder or on PYTHONPATH); the recorded changes "
        "(pruned, thinned, factorised layers) are applied to it",
    )


def load_factory(spec: str):
    """The callable named by ``--model-factory package.module:function`` (the user names the
    code to run; nothing is imported from a file's contents). The current folder is searched
    after ``sys.path``."""
    import importlib

    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name.replace(".", "_").isidentifier():
        raise ValueError(
            f"--model-factory={spec!r}: must be package.module:function (an importable "
            "function returning an nn.Module)"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--model-factory={spec!r}: cannot import '{mod_name}': {exc}") from exc
    for part in fn_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"--model-factory={spec!r}: '{mod_name}' has no '{fn_name}'")
    if not callable(obj):
        raise ValueError(f"--model-factory={spec!r}: '{fn_name}' is not callable")
    return obj


def build_from_factory(spec: str):
    """Call ``--model-factory``'s function; it must return an ``nn.Module``."""
    from torch import nn

    model = load_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"--model-factory={spec!r}: returned {type(model).__name__}, not an nn.Module"
        )
    return model


def _factory_hint(sidecar: dict | None, class_name: str | None) -> str:
    recorded = ((sidecar or {}).get("extra") or {}).get("model_factory")
    what = f" returning a fresh {class_name}" if class_name else ""
    if isinstance(recorded, str):
        return f"pass --model-factory {recorded} (the factory it was made with{what})"
    return f"pass --model-factory package.module:function{what}"


def open_model(path: Path, args: argparse.Namespace):
    """``(model, sidecar)`` of a checkpoint or ``.ncz`` file, built with ``--model-factory``
    when given; a custom architecture without it is refused with the exact flag to pass."""
    from ..engine.checkpoint import read_sidecar
    from ..io import ArchitectureMissing, load_model_file

    spec = getattr(args, "model_factory", None)
    if spec is None and path.suffix == ".safetensors":
        side = read_sidecar(path)
        arch = side.get("architecture") or {}
        if arch.get("model") is None and "spec" not in arch:
            raise ValueError(
                f"'{path}' holds a custom architecture (not in 'nncompress models'): "
                + _factory_hint(side, arch.get("class"))
            )
    fresh = build_from_factory(spec) if spec else None
    try:
        return load_model_file(path, fresh)
    except ArchitectureMissing as exc:
        raise ValueError(f"'{path}': {exc}; {_factory_hint(None, exc.class_name)}") from exc


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of a table"
    )


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="hide progress bars")


def dataset_for(
    sidecar: dict, data_dir: str | None, fallback: str | None = None, path: Path | None = None
):
    """Load the dataset a model was trained on (named in its sidecar), or ``fallback``
    (``--dataset``) when the file records none."""
    from ..data import load_dataset

    ds = sidecar.get("dataset") or {}
    name = ds.get("name") or fallback
    if not name:
        where = f"'{path}'" if path else "the model file"
        raise ValueError(
            f"{where} does not record its dataset: pass --dataset {'|'.join(DATASETS)}"
        )
    return load_dataset(name, data_dir)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(
    title: str,
    headers: list[str],
    rows: list[list[Any]],
    *,
    left: tuple[str, ...] = ("layer", "type", "name", "stage"),
) -> None:
    """A table on stdout: a rich table on a terminal (printed wider than the terminal rather
    than cutting numbers into ellipses), plain markdown in a log or a pipe (every number in
    full, greppable, no width limit)."""
    cells = [[_cell(v) for v in r] for r in rows]
    if not out.is_terminal:
        lines = [f"{title}", ""] if title else []
        lines.append("| " + " | ".join(headers) + " |")
        lines.append(
            "|"
            + "|".join("---" if h in left or i == 0 else "---:" for i, h in enumerate(headers))
            + "|"
        )
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        out.print("\n".join(lines) + "\n", highlight=False, markup=False)
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        justify = "left" if h in left or i == 0 else "right"
        table.add_column(h, justify=justify, no_wrap=True)
    for r in cells:
        table.add_row(*r)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    need = sum(widths) + 3 * len(widths) + 1
    if need <= out.width:
        out.print(table)
    else:  # never squeeze numbers into ellipses: print wider than the terminal
        Console(file=sys.stdout, width=need).print(table)


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
        self.path = Path(args.checkpoint)
        self.factory = getattr(args, "model_factory", None)
        self.model, self.sidecar = open_model(self.path, args)
        self._data_dir = getattr(args, "data_dir", None)
        self._dataset = getattr(args, "dataset", None)
        self._splits = None
        show = not getattr(args, "quiet", False) if bars is None else bars
        self.progress = RichProgress(show)

    @property
    def splits(self):
        """The dataset the checkpoint names, loaded on first use (so checks of the model, such
        as layer selections, fail before the data is read)."""
        if self._splits is None:
            self._splits = dataset_for(self.sidecar, self._data_dir, self._dataset, self.path)
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

        arch = self.architecture
        reference = None
        if arch.get("model") is None and "spec" not in arch and self.factory:
            reference = build_from_factory(self.factory)  # changes recorded against it
            extra = {**extra, "model_factory": self.factory}
        return save_checkpoint(
            model,
            path,
            model_name=arch.get("model"),
            model_kwargs=arch.get("kwargs") or {},
            dataset=self.splits.describe(),
            metrics=metrics,
            history=list(self.sidecar.get("history") or []),
            extra=extra,
            reference=reference,
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
