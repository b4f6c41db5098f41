"""Train the baseline models every compression benchmark is measured against.

Fashion-MNIST, 55k train / 5k held-out / 10k test. The recipe of each baseline (seed, epochs,
optimiser, schedule, augmentation) is stored in RECIPES below and in each checkpoint's sidecar.
One baseline per model (seed 0): the compression benchmarks vary the seeds of the compression
on this same baseline.

    python benchmarks/baselines.py                       # all three
    python benchmarks/baselines.py --models lenet-5      # one
    python benchmarks/baselines.py --report-only         # rebuild results/baselines.*
"""

from __future__ import annotations

import argparse
import json
import time

from _common import (
    PATHS,
    add_protocol_args,
    command,
    load_splits,
    out_dir,
    setup,
    write_json,
    write_result,
)
from nncompress.engine import TrainConfig

RECIPES: dict[str, TrainConfig] = {
    "lenet-300-100": TrainConfig(epochs=30, lr=0.05, weight_decay=1e-4, seed=0),
    "lenet-5": TrainConfig(epochs=20, lr=0.05, weight_decay=5e-4, augment=True, seed=0),
    "resnet-20": TrainConfig(epochs=12, lr=0.1, weight_decay=5e-4, augment=True, seed=0),
}
TARGETS = {"lenet-300-100": 89.5, "lenet-5": 91.5, "resnet-20": 92.5}


def report(argv: list[str] | None, rebuilt: bool = False) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((PATHS.results / "baselines").glob("*.json"))]
    md = [
        "| model | held-out accuracy (%) | test accuracy (%) | target (%) | train wall time (s) "
        "| epochs | lr | augment |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rc = r["recipe"]
        val = r.get("val_accuracy")
        md.append(
            f"| {r['model']} | {'-' if val is None else f'{val:.2f}'} | "
            f"{r['test_accuracy']:.2f} | >= {r['target']} | {r['wall_time_s']:.0f} | "
            f"{rc['epochs']} | {rc['lr']} | {rc['augment']} |"
        )
    md += [
        "",
        "One seed per baseline (seed 0); wall times are of training on the shared 2-core "
        "machine, one thread.",
    ]
    md += [f"- {r['model']}: trained by {r['trained_by']}" for r in rows if r.get("trained_by")]
    data = {"rows": rows, "compute_s": sum(r["wall_time_s"] for r in rows)}
    if rebuilt:
        # the section is the rows' (trained by one command, recorded in each row); this run
        # only rebuilt the report, and says so
        data["report_rebuilt_by"] = command(argv)
        md.append(
            f"This report was rebuilt by `{command(argv)}` from the rows above; the machine "
            "record in the header is of that run."
        )
        trained = {r.get("command") for r in rows}
        if len(trained) == 1 and None not in trained:
            argv = ["baselines.py", *trained.pop().split()[2:]]
    write_result("baselines", data, "\n".join(md), argv)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(RECIPES), help="comma-separated subset")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the results")
    add_protocol_args(ap, seeds="0")
    args = ap.parse_args(argv)
    setup(args)
    full_argv = None if argv is None else ["baselines.py", *argv]
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in RECIPES:
            raise SystemExit(f"--models: {m!r} is not one of {sorted(RECIPES)}")
    if args.report_only:
        report(full_argv, rebuilt=True)
        return
    from nncompress.cli.basic import train_model

    splits = load_splits()
    dest = PATHS.baselines
    if args.smoke:  # 1 epoch of the LeNets; keeps the smoke tree's tiny stand-ins untouched
        names = [n for n in names if n.startswith("lenet")]
        dest = out_dir("baselines-smoke")
    for name in names:
        cfg = RECIPES[name]
        if args.smoke:
            cfg = cfg.replace(epochs=1)
        t0 = time.perf_counter()
        _, metrics = train_model(
            name,
            splits,
            cfg,
            dest / f"{name}.safetensors",
            channels_last=name.startswith("resnet"),
        )
        row = {
            "model": name,
            "val_accuracy": metrics["val_accuracy"],
            "test_accuracy": metrics["test_accuracy"],
            "target": TARGETS[name],
            "wall_time_s": time.perf_counter() - t0,
            "recipe": cfg.__dict__,
            "command": command(full_argv),
        }
        write_json(PATHS.results / "baselines" / f"{name}.json", row)
        print(f"{name}: {metrics['test_accuracy']:.2f}% in {row['wall_time_s']:.0f} s", flush=True)
    report(full_argv)


if __name__ == "__main__":
    main()
