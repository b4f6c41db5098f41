"""Finish the benchmark-only NNCodec environment (benchmarks/.venv-nncodec, `make nncodec-venv`).

NNCodec 2.1.3 declares torchvision, opencv, pandas, ptflops and torchmetrics as dependencies,
but its coder (``nncodec.nnc.compress`` / ``decompress``) needs none of them: only the
application helpers (datasets and data transforms of its example use cases) import torchvision
and cv2, and ``import nncodec.nnc`` pulls those helpers in. The torchvision on the index is a
CUDA build that cannot load beside the CPU torch of this project, so the make target installs
nncodec with ``--no-deps`` plus what the coder really imports, and this script writes import
stubs for ``torchvision`` (with ``datasets`` and ``transforms``) and ``cv2``.

The helpers touch those modules at import time (``transforms.Compose([...])`` at module level,
``class ImageNetDataset(datasets.ImageFolder)``), so every attribute of a stub is an inert
placeholder class: it can be named, subclassed and constructed, but using an instance (calling
it, indexing it, iterating it, reading an attribute of it or of its class) raises
ImportError. Nothing of the coder goes through them; ``check_stubs`` checks both facts, then
``nncodec.nnc`` is imported. Run with the NNCodec environment's python; never imported by the
package or tests.
"""

from __future__ import annotations

import site
from pathlib import Path

STUB = '''"""Import stub written by nncompress benchmarks/nncodec_env.py: NNCodec's coder never
uses {name}; only its example applications do, and they are not run here."""
{imports}

def _unavailable(what):
    raise ImportError("{name} is a stub in this benchmark-only environment: %s is unavailable"
                      % what)


class _Unusable(type):
    def __getattr__(cls, attr):  # class attributes (datasets.CIFAR10.classes, ...)
        if attr.startswith("__"):
            raise AttributeError(attr)
        _unavailable(cls.__name__ + "." + attr)


class _Placeholder(metaclass=_Unusable):
    """Inert stand-in: may be constructed (helpers do so at import time), never used."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        _unavailable(type(self).__name__)

    def __getitem__(self, key):
        _unavailable(type(self).__name__)

    def __len__(self):
        _unavailable(type(self).__name__)

    def __iter__(self):
        _unavailable(type(self).__name__)

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        _unavailable(type(self).__name__ + "." + attr)


def __getattr__(attr):
    if attr.startswith("__"):  # keep the import machinery's probes (__path__, ...) honest
        raise AttributeError(attr)
    return _Unusable(attr, (_Placeholder,), {{"__module__": __name__}})
'''

# package -> submodules (real stub modules, so `from torchvision import datasets` finds them)
STUBS = {"torchvision": ["datasets", "transforms"], "cv2": []}


def write_stubs(target: Path) -> None:
    for package, modules in STUBS.items():
        root = target / package
        root.mkdir(exist_ok=True)
        imports = "".join(f"\nfrom . import {m}  # noqa: E402" for m in modules)
        (root / "__init__.py").write_text(STUB.format(name=package, imports=imports))
        for mod in modules:
            (root / f"{mod}.py").write_text(STUB.format(name=f"{package}.{mod}", imports=""))


def check_stubs() -> None:
    """The helpers' import-time uses work; any real use raises ImportError."""
    import torchvision
    from torchvision import datasets, transforms

    class Sub(datasets.ImageFolder):  # what nncodec's imagenet helper does at import time
        pass

    trafo = transforms.Compose([transforms.Resize(256), transforms.ToTensor()])
    for use in (lambda: trafo(None), lambda: Sub("root")[0], lambda: torchvision.ops.nms(None)):
        try:
            use()
        except ImportError:
            continue
        raise AssertionError("a torchvision stub was usable; it must raise ImportError")


def main() -> None:
    target = Path(site.getsitepackages()[0])
    write_stubs(target)
    check_stubs()
    import nncodec.nnc  # noqa: F401 - the import must now succeed
    from nncodec.nnc import compress, decompress  # noqa: F401

    print(f"nncodec import OK; stubs in {target}")


if __name__ == "__main__":
    main()
