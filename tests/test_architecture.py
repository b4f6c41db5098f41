"""The import rule of docs/architecture.md, checked on the source with ``ast``:

    cli -> recipe -> stages -> families (prune, quant, lowrank, distill, conditional, policy)
        -> {engine, stats, coding, models, data, io} -> core

A package may import its own modules and any package of a lower layer (the base layer's
packages may import each other); no family imports another family; the root package
``nncompress`` (version, lazy exports) may be imported from anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import nncompress

SRC = Path(__file__).resolve().parents[1] / "src" / "nncompress"

FAMILIES = ("prune", "quant", "lowrank", "distill", "conditional", "policy")
BASE = ("engine", "stats", "coding", "models", "data", "io")
LAYERS = {"core": 0, **dict.fromkeys(BASE, 1), **dict.fromkeys(FAMILIES, 2)}
LAYERS.update(stages=3, recipe=4, cli=5)


def forbidden(src: str, dst: str) -> str | None:
    """Why package ``src`` may not import package ``dst`` (``None``: allowed)."""
    if src == dst or dst == "":  # own modules; the root package
        return None
    if src not in LAYERS or dst not in LAYERS:
        return f"'{src}' or '{dst}' is not a package of the layering (add it to LAYERS)"
    if src in FAMILIES and dst in FAMILIES:
        return f"family '{src}' imports family '{dst}' (families never import each other)"
    if LAYERS[dst] > LAYERS[src]:
        return f"'{src}' (layer {LAYERS[src]}) imports '{dst}' (layer {LAYERS[dst]}, above it)"
    return None


_PACKAGES = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}


def _package_of(module: str) -> str | None:
    """``nncompress.prune.graph.rules`` -> ``prune``; ``nncompress`` and its attributes
    (``nncompress.__version__``) -> ``''``; other libraries -> ``None``."""
    parts = module.split(".")
    if parts[0] != "nncompress":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in _PACKAGES else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """Absolute names of the nncompress modules imported by ``path`` (relative ones resolved),
    every import in the file (lazy imports inside functions included)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    here = list(rel.parts)
    if here[-1] == "__init__":
        here = here[:-1]
    else:
        here = here[:-1]  # the package the module is in
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            out += [(node.lineno, t) for t in targets]
    return out


def test_layers_name_every_package_and_the_families_of_the_package():
    assert _PACKAGES <= set(LAYERS), sorted(_PACKAGES - set(LAYERS))
    assert tuple(nncompress.FAMILIES) == FAMILIES


def test_the_rule_itself_covers_families_not_written_yet():
    assert forbidden("conditional", "prune") and forbidden("policy", "quant")
    assert forbidden("quant", "prune") and forbidden("prune", "stages")
    assert forbidden("engine", "lowrank") and forbidden("core", "engine")
    assert forbidden("recipe", "cli") and forbidden("stages", "recipe")
    assert forbidden("conditional", "engine") is None and forbidden("policy", "core") is None
    assert forbidden("stages", "conditional") is None and forbidden("io", "engine") is None
    assert forbidden("cli", "recipe") is None and forbidden("prune", "") is None


def test_no_forbidden_import_edge():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        src = _package_of(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if src == "":  # the root package's lazy exports
            continue
        for line, name in _imports(path):
            dst = _package_of(name)
            if dst is None:
                continue
            why = forbidden(src, dst)
            if why:
                bad.append(f"{path.relative_to(SRC.parent)}:{line} imports {name}: {why}")
    assert not bad, "\n".join(bad)


def test_subpackages_are_attributes_and_module_types_are_found_by_registry():
    # a fresh interpreter: nothing imported yet; a TT layer's spec rebuilds through the
    # registry lowrank registers in (found by importing the families), not a string table
    code = (
        "import sys, nncompress\n"
        "assert 'nncompress.lowrank' not in sys.modules\n"
        "from nncompress.engine.modspec import module_from_spec\n"
        "spec = {'type': 'TTLinear', 'kwargs': {'in_modes': [2, 2], 'out_modes': [3, 1],"
        " 'ranks': [2], 'bias': True}}\n"
        "m = module_from_spec(spec)\n"
        "assert type(m).__name__ == 'TTLinear' and 'nncompress.lowrank' in sys.modules\n"
        "assert nncompress.models.create is not None and nncompress.core.LayerSelector\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with pytest.raises(AttributeError):
        nncompress.no_such_thing  # noqa: B018
