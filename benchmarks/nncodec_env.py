"""Finish the benchmark-only NNCodec environment (benchmarks/.venv-nncodec, `make nncodec-venv`).

NNCodec 2.1.3 declares torchvision, opencv, pandas, ptflops and torchmetrics as dependencies,
but its coder (``nncodec.nnc.compress`` / ``decompress``) needs none of them: only the
application helpers (data transforms of its example use cases) import torchvision and cv2 at
module level. The torchvision on the index is a CUDA build that cannot load beside the CPU
torch of this project, so the make target installs nncodec with ``--no-deps`` plus what the
coder really imports, and this script adds two import stubs that raise if anything actually
uses them. Run with the NNCodec environment's python; never imported by the package or tests.
"""

from __future__ import annotations

import site
from pathlib import Path

STUB = '''"""Import stub written by nncompress benchmarks/nncodec_env.py: NNCodec's coder never
uses {name}; only its example applications do, and they are not run here."""


def __getattr__(attr):
    raise ImportError("{name} is a stub in this benchmark-only environment (no {name}.%s)" % attr)
'''


def main() -> None:
    target = Path(site.getsitepackages()[0])
    for package, modules in {"torchvision": ["transforms"], "cv2": []}.items():
        root = target / package
        root.mkdir(exist_ok=True)
        (root / "__init__.py").write_text(STUB.format(name=package))
        for mod in modules:
            (root / f"{mod}.py").write_text(STUB.format(name=f"{package}.{mod}"))
    import nncodec.nnc  # noqa: F401 - the import must now succeed

    print(f"nncodec import OK; stubs in {target}")


if __name__ == "__main__":
    main()
