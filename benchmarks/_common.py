"""Helpers shared by the benchmark scripts: machine description, JSON + markdown output,
and access to the baseline checkpoints that every compression benchmark compares against."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BASELINES = ROOT / "out" / "baselines"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def command() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def write_result(name: str, data: dict, markdown: str) -> None:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (atomically)."""
    from nncompress.engine import atomic_write

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "command": command(), "machine": machine(), **data}
    atomic_write(
        RESULTS / f"{name}.json",
        lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True, default=str)),
    )
    header = (
        f"_Command: `{data['command']}` — {data['machine']['cpu']}, "
        f"{data['machine']['cores']} cores, torch {data['machine']['torch']}, "
        f"{data['machine']['date']}_\n\n"
    )
    atomic_write(RESULTS / f"{name}.md", lambda p: p.write_text(header + markdown.rstrip() + "\n"))


def baseline(name: str) -> Path:
    """Path of a baseline checkpoint made by ``benchmarks/baselines.py`` (error if missing)."""
    path = BASELINES / f"{name}.safetensors"
    if not path.is_file():
        sys.exit(
            f"baseline '{path}' is missing: run 'python benchmarks/baselines.py "
            f"--models {name}' first"
        )
    return path


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
