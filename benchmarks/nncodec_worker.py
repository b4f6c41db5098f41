"""Compress and decompress one set of weights with NNCodec under many settings.

Run by benchmarks/coding_vs_nncodec.py with the NNCodec environment's python
(benchmarks/.venv-nncodec, ``make nncodec-venv``), never with the project's: NNCodec needs
numpy < 2 and its own build. Usage::

    python nncodec_worker.py WEIGHTS.npz CONFIGS.json OUT_DIR

``CONFIGS.json`` is a list of keyword dicts for ``nncodec.nnc.compress`` (qp, use_dq,
lambda_scale, codebook_mode, nonweight_qp, ...). For config ``i`` it writes
``OUT_DIR/i.nnc`` (the bitstream), ``OUT_DIR/i.npz`` (the decoded tensors) and appends a line
to ``OUT_DIR/results.jsonl`` with the byte count and the encode / decode times.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from nncodec.nnc import compress, decompress

    weights_path, configs_path, out_dir = sys.argv[1:4]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(weights_path) as f:
        params = {k: np.ascontiguousarray(f[k], dtype=np.float32) for k in f.files}
    configs = json.loads(Path(configs_path).read_text())
    with (out / "results.jsonl").open("a") as log:
        for i, cfg in enumerate(configs):
            path = out / f"{i}.nnc"
            sink = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sink):
                compress(dict(params), bitstream_path=str(path), verbose=False, **cfg)
            t1 = time.perf_counter()
            with contextlib.redirect_stdout(sink):
                rec = decompress(str(path), verbose=False)
            t2 = time.perf_counter()
            np.savez(
                out / f"{i}.npz", **{k: np.asarray(v, dtype=np.float32) for k, v in rec.items()}
            )
            row = {"index": i, "config": cfg, "bytes": path.stat().st_size,
                   "encode_s": t1 - t0, "decode_s": t2 - t1}  # fmt: skip
            log.write(json.dumps(row) + "\n")
            log.flush()


if __name__ == "__main__":
    main()
