"""Hostile checkpoint sidecars and ``.ncz`` model descriptions (issue 19, items 5 and 12).

The sidecar digest in a checkpoint's safetensors metadata catches accidents, not an attacker:
each crafted sidecar here is re-signed (the weights file rewritten with its digest), so only
the field validation stands between it and the module constructors."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from nncompress.engine import CheckpointError, load_checkpoint, save_checkpoint, sidecar_path
from nncompress.engine.checkpoint import _canonical, _tensor_digest
from nncompress.io import decode_to_checkpoint, save_compressed
from nncompress.models import create


def _resign(path, sidecar: dict, tensors: dict | None = None) -> None:
    """Write ``sidecar`` (and ``tensors``) as a consistent checkpoint: both digests valid."""
    tensors = tensors if tensors is not None else load_file(str(path))
    sidecar = dict(sidecar, tensors_sha256=_tensor_digest(tensors))
    sidecar_path(path).write_text(json.dumps(sidecar))
    meta = {"format": sidecar.get("format", "x"), "sidecar_sha256": _sha(sidecar)}
    save_file(tensors, str(path), metadata=meta)


def _sha(sidecar: dict) -> str:
    return hashlib.sha256(_canonical(sidecar)).hexdigest()


@pytest.fixture
def ckpt(tmp_path):
    path = save_checkpoint(
        create("lenet-300-100"),
        tmp_path / "m.safetensors",
        model_name="lenet-300-100",
        model_kwargs={"num_classes": 10, "in_features": 784},
        dataset={"name": "synthetic", "num_classes": 10, "input_shape": [1, 28, 28]},
    )
    return path, json.loads(sidecar_path(path).read_text())


def _arch(side: dict, **changes) -> dict:
    return dict(side, architecture={**side["architecture"], **changes})


def _lin(i, o):
    return {"type": "Linear", "kwargs": {"in_features": i, "out_features": o, "bias": True}}


def _nested(depth: int) -> dict:
    spec = _lin(2, 2)
    for _ in range(depth):
        spec = {"type": "Sequential", "children": {"0": spec}}
    return spec


HOSTILE = {
    # constructor arguments of the registry model: the 120 TB / 4 TB allocations of issue 19
    "huge num_classes": (
        lambda s: _arch(s, kwargs={"num_classes": 10**9, "in_features": 784}),
        r"num_classes=1000000000: must be an integer in \[1, 1048576\]",
    ),
    "huge in_features": (
        lambda s: _arch(s, kwargs={"num_classes": 10, "in_features": 10**7}),
        r"needs 3,000,031,410 values in 6 tensors, the weights present hold 266,610",
    ),
    "negative size": (
        lambda s: _arch(s, kwargs={"num_classes": -3, "in_features": 784}),
        r"num_classes=-3: must be an integer",
    ),
    "string size": (
        lambda s: _arch(s, kwargs={"num_classes": "10", "in_features": 784}),
        r"num_classes='10': must be an integer",
    ),
    "unknown kwarg": (
        lambda s: _arch(s, kwargs={"hidden": 5}),
        r"unknown argument\(s\) \['hidden'\]; allowed",
    ),
    "unknown model": (lambda s: _arch(s, model="alexnet"), r"architecture.model='alexnet'"),
    # replacement specs: a 360 GB Linear, negative dims, types, nesting
    "huge replacement": (
        lambda s: _arch(s, replacements={"fc1": _lin(300_000, 300_000)}),
        r"needs 90,000,331,110 values .* \('fc1.bias' is \(300,\), the architecture needs \(300000,\)",
    ),
    "negative replacement": (
        lambda s: _arch(s, replacements={"fc1": _lin(-5, 300)}),
        r"cannot (be built|rebuild)",
    ),
    "replacement kwarg type": (
        lambda s: _arch(s, replacements={"fc1": _lin("784", 300)}),
        r"cannot rebuild",
    ),
    "replacement float inf": (
        lambda s: _arch(s, replacements={"fc1": _lin(784, 1e400)}),
        r"must be a bool, an integer",
    ),
    "unknown module type": (
        lambda s: _arch(s, replacements={"fc1": {"type": "os.system", "kwargs": {}}}),
        r"unknown module type 'os.system'",
    ),
    "deep spec": (
        lambda s: _arch(s, replacements={"fc1": _nested(70)}),
        r"nested more than 64 levels deep",
    ),
    "delete missing module": (
        lambda s: _arch(s, replacements={"nope": None}),
        r"replacement 'nope': no such module",
    ),
    "bad module name": (
        lambda s: _arch(s, replacements={"fc1..x": None}),
        r"'fc1..x' is not a module name",
    ),
    "long list kwarg": (
        lambda s: _arch(
            s,
            replacements={"fc1": {"type": "LayerNorm", "kwargs": {"normalized_shape": [1] * 100}}},
        ),  # fmt: skip
        r"a list of 100 items \(at most 64\)",
    ),
    # the sidecar's own fields
    "architecture missing": (
        lambda s: {k: v for k, v in s.items() if k != "architecture"},
        r"field 'architecture' is missing",
    ),
    "architecture list": (lambda s: dict(s, architecture=[1]), r"'architecture'=\[1\] must be"),
    "unknown architecture key": (lambda s: _arch(s, code="x"), r"unknown key\(s\) \['code'\]"),
    "dataset string": (lambda s: dict(s, dataset="mnist"), r"'dataset'='mnist' must be dict"),
    "dataset without name": (lambda s: dict(s, dataset={"x": 1}), r"field 'name' is missing"),
    "dataset shape": (
        lambda s: dict(s, dataset={"name": "mnist", "input_shape": [1, -28, 28]}),
        r"input_shape=\[1, -28, 28\]",
    ),
    "metrics list": (lambda s: dict(s, metrics=[1]), r"'metrics'=\[1\] must be dict"),
    "history dict": (lambda s: dict(s, history={}), r"'history'=\{\} must be list"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_sidecar_is_refused_before_building(ckpt, case):
    path, side = ckpt
    edit, message = HOSTILE[case]
    _resign(path, edit(side))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # nothing near the sizes asked for was allocated


def test_deeply_nested_sidecar_is_refused_without_recursion(ckpt):
    path, side = ckpt
    deep = "[" * 100_000 + "]" * 100_000
    text = json.dumps(dict(side, extra={"x": 0})).replace('{"x": 0}', deep)
    sidecar_path(path).write_text(text)
    with pytest.raises(CheckpointError, match="nested more than 200 levels deep"):
        load_checkpoint(path)


def test_duplicate_keys_in_sidecar_are_refused(ckpt):
    path, side = ckpt
    text = json.dumps(side).replace('"format":', '"format": "x", "format":', 1)
    sidecar_path(path).write_text(text)
    with pytest.raises(CheckpointError, match="duplicate key 'format'"):
        load_checkpoint(path)


def test_weights_of_another_architecture_are_refused_by_count(ckpt, tmp_path):
    """The sidecar is consistent and valid, but describes a model whose tensors are not the
    ones present: refused by comparing on the meta device, not by load_state_dict."""
    path, side = ckpt
    other = create("lenet-300-100", in_features=64).state_dict()
    _resign(path, side, dict(other))
    with pytest.raises(
        CheckpointError, match=r"needs 266,610 values in 6 tensors, the weights present hold 50,610"
    ):
        load_checkpoint(path)


def test_hostile_ncz_model_description_is_refused(tmp_path, ckpt):
    path, side = ckpt
    model, _ = load_checkpoint(path)
    meta = {"checkpoint": {"architecture": _arch(side, replacements={"fc1": _lin(10**5, 10**5)})[
        "architecture"], "dataset": side["dataset"]}}  # fmt: skip
    ncz = tmp_path / "m.ncz"
    save_compressed(model, ncz, metadata=meta)
    with pytest.raises(ValueError, match=r"needs 10,000,131,110 values"):
        decode_to_checkpoint(ncz, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
    meta["checkpoint"]["architecture"] = side["architecture"]
    meta["checkpoint"]["dataset"] = ["nope"]
    save_compressed(model, ncz, metadata=meta)
    with pytest.raises(ValueError, match=r"the file's metadata: field 'dataset'"):
        decode_to_checkpoint(ncz, tmp_path / "d.safetensors")


def test_identical_checkpoints_are_identical_files(tmp_path):
    """Item 12: safetensors 0.8 writes its metadata map in hash order, which differs from one
    save to the next (2 orders in 20 saves of one process, measured); the header is written
    sorted, so the same checkpoint saved again is the same file."""
    torch.manual_seed(0)
    model = create("lenet-300-100", in_features=16)
    blobs = set()
    for i in range(12):
        p = save_checkpoint(
            model, tmp_path / f"c{i}.safetensors", model_name="lenet-300-100",
            model_kwargs={"in_features": 16}, metrics={"b": 1.0, "a": 2.0},
        )  # fmt: skip
        blobs.add(p.read_bytes())
    assert len(blobs) == 1
    data = blobs.pop()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) == [
        "format", "sidecar_sha256",
    ]  # fmt: skip
    loaded, _ = load_checkpoint(tmp_path / "c0.safetensors")
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)
