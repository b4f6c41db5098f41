"""Helpers shared by the benchmark scripts: the measuring protocol of benchmarks/README.md.

- ``add_protocol_args`` / ``setup``: every script takes ``--seeds`` (the seeds of the
  compression, default 0,1,2), ``--smoke`` (tiny synthetic data, tiny baselines trained on the
  fly, a few batches: seconds) and ``--results-dir``.
- ``load_splits`` / ``baseline``: Fashion-MNIST and the baseline checkpoints of
  ``baselines.py`` (or their smoke stand-ins).
- ``dense_control``: the dense baseline fine-tuned with the same extra budget as a compressed
  model (same epochs, learning-rate schedule, distillation, augmentation), cached per seed.
- ``machine`` / ``write_result``: the machine record (CPU model and flags, cores, library
  versions, load average sampled during the run) in every JSON and markdown header.
- ``mean_std`` / ``pm`` / ``summary_row``: mean +- std over seeds and the rows of the summary
  table at the top of RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("bench")


class _Paths:
    """Where results, intermediate files and baselines live (smoke runs use a separate tree)."""

    def __init__(self) -> None:
        self.results = ROOT / "results"
        self.out = ROOT / "out"
        self.baselines = ROOT / "out" / "baselines"
        self.smoke = False


PATHS = _Paths()
# kept for scripts that read them at import time; PATHS is the live value after setup()
RESULTS = PATHS.results
BASELINES = PATHS.baselines

# ------------------------------------------------------------------ arguments and setup


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds={text!r}: must be comma-separated integers, e.g. 0,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: must be distinct integers")
    return seeds


def add_protocol_args(ap: argparse.ArgumentParser, seeds: str = "0,1,2") -> None:
    ap.add_argument(
        "--seeds",
        type=parse_seeds,
        default=parse_seeds(seeds),
        help=f"seeds of the compression (and of its dense control), default {seeds}",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny synthetic data, tiny baselines trained on the fly, 1 epoch, 1 seed: checks "
        "that the script runs (seconds); writes under --results-dir (default out/smoke)",
    )
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="write results here (default benchmarks/results; smoke: out/smoke)",
    )


def add_results_dir_arg(ap: argparse.ArgumentParser) -> None:
    """``--results-dir`` alone, for scripts that define their own ``--seeds`` and ``--smoke``."""
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="write results here (default benchmarks/results; smoke: out/smoke)",
    )


def setup(args: argparse.Namespace) -> None:
    """Apply the protocol arguments: paths, one torch thread, logging, the load monitor."""
    global RESULTS, BASELINES
    torch.set_num_threads(1)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    PATHS.smoke = bool(args.smoke)
    if args.smoke:
        root = args.results_dir or ROOT / "out" / "smoke"
        PATHS.results, PATHS.out, PATHS.baselines = root / "results", root / "out", root / "base"
        if isinstance(getattr(args, "seeds", None), list):
            args.seeds = args.seeds[:1]
    else:
        PATHS.results = args.results_dir or ROOT / "results"
        PATHS.out, PATHS.baselines = ROOT / "out", ROOT / "out" / "baselines"
    RESULTS, BASELINES = PATHS.results, PATHS.baselines
    LOAD.start()


# ------------------------------------------------------------------ data and baselines

SMOKE_SHAPE = (1, 28, 28)


def load_splits(smoke: bool | None = None):
    """Fashion-MNIST (55k / 5k held-out / 10k test), or for ``--smoke`` a tiny synthetic set of
    28x28 images (384 / 128 / 128) that needs no download."""
    from nncompress.data import fashion_mnist, synthetic

    if PATHS.smoke if smoke is None else smoke:
        return synthetic(n=512, shape=SMOKE_SHAPE, num_classes=10, val_size=128, seed=0)
    return fashion_mnist()


def baseline(name: str) -> Path:
    """Path of a baseline checkpoint made by ``benchmarks/baselines.py`` (error if missing).

    Smoke runs train a tiny stand-in (1 epoch on the synthetic set, ResNet-20 at width 4) the
    first time it is asked for.
    """
    path = PATHS.baselines / f"{name}.safetensors"
    if PATHS.smoke and not path.is_file():
        _smoke_baseline(name, path)
    if not path.is_file():
        sys.exit(
            f"baseline '{path}' is missing: run 'python benchmarks/baselines.py "
            f"--models {name}' first"
        )
    return path


def _smoke_baseline(name: str, path: Path) -> None:
    from nncompress.engine import TrainConfig, config_to_dict, evaluate, fit, save_checkpoint
    from nncompress.models import create

    splits = load_splits(True)
    kwargs: dict = {"num_classes": 10}
    if name == "lenet-300-100":
        kwargs["in_features"] = 784
    elif name == "lenet-5":
        kwargs.update(in_channels=1, image_size=28)
    else:
        kwargs.update(in_channels=1, width=4)
    cfg = TrainConfig(epochs=1, lr=0.05, augment=name != "lenet-300-100", seed=0)
    torch.manual_seed(0)
    model = create(name, **kwargs)
    fit(model, splits.loader("train", 128, augment=cfg.augment), cfg)
    acc = evaluate(model, splits.loader("test", 128))["accuracy"]
    save_checkpoint(
        model,
        path,
        model_name=name,
        model_kwargs=kwargs,
        dataset=splits.describe(),
        metrics={"test_accuracy": acc},
        extra={"train_config": config_to_dict(cfg)},
    )


def baseline_id(name: str) -> str:
    """The baseline's tensor digest (changes when the baseline is retrained)."""
    side = json.loads(baseline(name).with_suffix(".json").read_text())
    return side.get("tensors_sha256") or hashlib.sha256(baseline(name).read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    from nncompress.engine import atomic_write

    blob = json.dumps(obj, indent=1, default=str)
    atomic_write(Path(path), lambda p: p.write_text(blob))


def out_dir(name: str) -> Path:
    """``benchmarks/out/NAME`` (smoke runs: under the smoke tree)."""
    d = PATHS.out / name
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------------ dense control


@dataclass(frozen=True)
class Phase:
    """One fine-tuning call of a compression's extra training budget.

    ``lr_scale`` multiplies the baseline's learning rate (or ``lr`` when given); ``distill`` is
    ``(temperature, alpha)`` from the frozen baseline; the rest as in TrainConfig.
    """

    epochs: int
    lr_scale: float = 1.0
    distill: tuple[float, float] | None = None
    augment: bool = False
    grad_clip: float | None = None
    restore_best: bool = False
    lr: float | None = None
    weight_decay: float | None = None
    train_limit: int | None = None


def dense_control(
    name: str, phases: list[Phase], seed: int, splits, *, channels_last: bool = False
) -> dict:
    """The dense baseline fine-tuned with ``phases`` (the compressed row's extra budget).

    Held-out accuracy is recorded; the test split is evaluated once. Cached by (baseline digest,
    phases, seed) under out/controls, so rows with the same budget share one control run.
    """
    from nncompress.distill import DistillConfig, distillation_loss
    from nncompress.engine import (
        TrainConfig,
        config_from_dict,
        evaluate,
        finetune,
        load_checkpoint,
    )

    key = json.dumps(
        {"b": baseline_id(name), "p": [asdict(p) for p in phases], "s": seed}, sort_keys=True
    )
    f = out_dir("controls") / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    if f.is_file():
        return json.loads(f.read_text())
    model, side = load_checkpoint(baseline(name))
    base = config_from_dict(TrainConfig, side["extra"]["train_config"])
    teacher = copy.deepcopy(model).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    val = splits.loader("val", 1000)
    t0 = time.perf_counter()
    for ph in phases:
        cfg = base.replace(
            epochs=ph.epochs,
            seed=seed,
            augment=ph.augment,
            grad_clip=ph.grad_clip,
            restore_best=ph.restore_best,
            lr=ph.lr if ph.lr is not None else base.lr,
            weight_decay=ph.weight_decay if ph.weight_decay is not None else base.weight_decay,
        )
        loss = distillation_loss(teacher, DistillConfig(*ph.distill)) if ph.distill else None
        loader = splits.loader(
            "train", cfg.batch_size, seed=seed, augment=ph.augment, limit=ph.train_limit
        )
        finetune(model, loader, cfg, lr_scale=ph.lr_scale, val_loader=val, loss_fn=loss)
    res = {
        "model": name,
        "seed": seed,
        "phases": [asdict(p) for p in phases],
        "val_accuracy": evaluate(model, val)["accuracy"],
        "test_accuracy": evaluate(model, splits.loader("test", 1000))["accuracy"],
        "wall_s": time.perf_counter() - t0,
    }
    write_json(f, res)
    log.info("dense control %s seed %d: %s", name, seed, res)
    return res


# ------------------------------------------------------------------ statistics


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    xs = [float(x) for x in xs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def pm(xs: list[float], digits: int = 2) -> str:
    """'m +- s (n=k)', or 'm (1 seed)'."""
    if not xs:
        return "-"
    m, s = mean_std(xs)
    if s is None:
        return f"{m:.{digits}f} (1 seed)"
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(xs)})"


def summary_row(
    *,
    model: str,
    method: str,
    size: str,
    test: list[float],
    val: list[float],
    baseline_test: float,
    control_test: list[float] | None,
    target: str | None = None,
    met: bool | None = None,
    seeds: list[int] | None = None,
    note: str = "",
) -> dict:
    """One row of the RESULTS.md summary (written into each script's JSON as ``summary``)."""
    m = statistics.fmean(test)
    row = {
        "model": model,
        "method": method,
        "size": size,
        "test": list(test),
        "val": list(val),
        "baseline_test": baseline_test,
        "lost_vs_baseline": baseline_test - m,
        "control_test": list(control_test) if control_test else None,
        "lost_vs_control": (statistics.fmean(control_test) - m) if control_test else None,
        "target": target,
        "met": met,
        "seeds": list(seeds or []),
        "note": note,
    }
    return row


# ------------------------------------------------------------------ machine record


class _LoadMonitor:
    """Samples the 1-minute load average every 10 s while the script runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._thread: threading.Thread | None = None
        self.t0: float | None = None  # perf_counter at setup(): the run's wall time starts

    def start(self) -> None:
        if self._thread is None:
            self.t0 = time.perf_counter()
            self.samples.append(os.getloadavg()[0])
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(10)
            self.samples.append(os.getloadavg()[0])

    def record(self) -> dict:
        s = self.samples + [os.getloadavg()[0]]
        return {
            "samples": len(s),
            "min": min(s),
            "mean": statistics.fmean(s),
            "max": max(s),
            "last": s[-1],
        }


LOAD = _LoadMonitor()


def cpu_flags() -> list[str]:
    """The CPU flags that matter for these kernels: avx*, fma, f16c, *vnni*, amx*."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = ("avx", "amx", "fma", "f16c")
                return sorted(f for f in flags if f.startswith(keep) or "vnni" in f)
    except OSError:
        pass
    return []


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    import numpy

    return {
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort,
        "numpy": numpy.__version__,
        "load_average": LOAD.record(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    flags = " ".join(m.get("cpu_flags") or []) or "flags not recorded"
    load = m.get("load_average")
    load_text = (
        f"load average {load['min']:.1f}-{load['max']:.1f} (mean {load['mean']:.1f})"
        if isinstance(load, dict)
        else "load not recorded"
    )
    return (
        f"{m.get('cpu')}, {m.get('cores')} cores ({flags}), torch {m.get('torch')}, "
        f"onnxruntime {m.get('onnxruntime')}, {load_text} during the run, {m.get('date')}"
    )


def command(argv: list[str] | None = None) -> str:
    """The script's command line as run from benchmarks/ (``python NAME.py ARGS``)."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join(["python", Path(argv[0]).name, *argv[1:]])


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        ).stdout.strip()
    except OSError:
        return ""


def write_result(name: str, data: dict, markdown: str, argv: list[str] | None = None) -> None:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (atomically), both with the full
    command, the machine record and the git revision."""
    from nncompress.engine import atomic_write

    PATHS.results.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "command": command(argv),
        "smoke": PATHS.smoke,
        "git": git_rev(),
        "machine": machine(),
        # wall time of this run (setup() to now); rows a resumed run reused are not in it
        "run_wall_s": None if LOAD.t0 is None else time.perf_counter() - LOAD.t0,
        **data,
    }
    atomic_write(
        PATHS.results / f"{name}.json",
        lambda p: p.write_text(json.dumps(data, indent=1, sort_keys=True, default=str)),
    )
    header = (
        f"_Command (from benchmarks/): `{data['command']}` — {machine_line(data['machine'])}_\n\n"
    )
    atomic_write(
        PATHS.results / f"{name}.md", lambda p: p.write_text(header + markdown.rstrip() + "\n")
    )
