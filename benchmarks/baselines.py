"""Train the baseline models every compression benchmark is measured against.

Fashion-MNIST, 55k train / 5k held-out / 10k test. The recipe of each baseline (seed, epochs,
optimiser, schedule, augmentation) is stored in RECIPES below and in each checkpoint's sidecar.

    python benchmarks/baselines.py                       # all three
    python benchmarks/baselines.py --models lenet-5      # one
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import BASELINES, RESULTS, write_result
from nncompress.cli.basic import train_model
from nncompress.data import fashion_mnist
from nncompress.engine import TrainConfig

RECIPES: dict[str, TrainConfig] = {
    "lenet-300-100": TrainConfig(epochs=30, lr=0.05, weight_decay=1e-4, seed=0),
    "lenet-5": TrainConfig(epochs=20, lr=0.05, weight_decay=5e-4, augment=True, seed=0),
    "resnet-20": TrainConfig(epochs=12, lr=0.1, weight_decay=5e-4, augment=True, seed=0),
}
TARGETS = {"lenet-300-100": 89.5, "lenet-5": 91.5, "resnet-20": 92.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(RECIPES), help="comma-separated subset")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in RECIPES:
            sys.exit(f"--models: {m!r} is not one of {sorted(RECIPES)}")
    splits = fashion_mnist(args.data_dir)
    for name in names:
        cfg = RECIPES[name]
        t0 = time.perf_counter()
        _, metrics = train_model(
            name,
            splits,
            cfg,
            BASELINES / f"{name}.safetensors",
            channels_last=name.startswith("resnet"),
        )
        row = {
            "model": name,
            "test_accuracy": metrics["test_accuracy"],
            "target": TARGETS[name],
            "wall_time_s": time.perf_counter() - t0,
            "recipe": cfg.__dict__,
        }
        (RESULTS / "baselines").mkdir(parents=True, exist_ok=True)
        (RESULTS / "baselines" / f"{name}.json").write_text(json.dumps(row, indent=2))
        print(f"{name}: {metrics['test_accuracy']:.2f}% in {row['wall_time_s']:.0f} s", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / "baselines").glob("*.json"))]
    md = [
        "| model | test accuracy (%) | target (%) | train wall time (s) | epochs | lr | augment |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rc = r["recipe"]
        md.append(
            f"| {r['model']} | {r['test_accuracy']:.2f} | >= {r['target']} | "
            f"{r['wall_time_s']:.0f} | {rc['epochs']} | {rc['lr']} | {rc['augment']} |"
        )
    write_result("baselines", {"rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
