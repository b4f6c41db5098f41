"""Checkpoints: bit-exact round trips, structural replacements, tamper detection, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from nncompress.engine import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_sidecar,
    save_checkpoint,
    sidecar_path,
)
from nncompress.models import create


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k  # bit-exact


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make weights and BN statistics differ from a fresh model (so a round trip is a test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.01)
    return model


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5", "resnet-20"])
def test_zoo_round_trip_bit_exact(tmp_path, name):
    model = _perturb(create(name))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(7)
    path = save_checkpoint(
        model,
        tmp_path / "m.safetensors",
        model_name=name,
        model_kwargs={"num_classes": 10},
        dataset={"name": "digits", "input_shape": [1, 28, 28]},
        metrics={"test_accuracy": 91.25},
        history=[{"epoch": 1, "train_loss": 0.5}],
    )
    loaded, side = load_checkpoint(path)
    assert type(loaded) is type(model)
    _assert_same_state(model, loaded)
    x = torch.randn(2, 1, 28, 28)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert side["metrics"] == {"test_accuracy": 91.25}
    assert side["architecture"] == {
        "model": name,
        "kwargs": {"num_classes": 10},
        "replacements": {},
    }
    assert side["nncompress_version"] and side["dataset"]["name"] == "digits"
    assert read_sidecar(path) == side


def test_modified_structure_round_trip(tmp_path):
    # a thinned conv1/conv2 and a low-rank fc1 (two Linear layers), as compression would do
    model = create("lenet-5")
    model.conv1 = nn.Conv2d(1, 12, 5)
    model.conv2 = nn.Conv2d(12, 30, 5)
    model.fc1 = nn.Sequential(nn.Linear(30 * 16, 40, bias=False), nn.Linear(40, 500))
    del model.dropout
    model.dropout = nn.Identity()
    _perturb(model)
    path = save_checkpoint(model, tmp_path / "thin.safetensors", model_name="lenet-5")
    side = read_sidecar(path)
    assert set(side["architecture"]["replacements"]) == {"conv1", "conv2", "fc1", "dropout"}
    loaded, _ = load_checkpoint(path)
    assert loaded.conv2.out_channels == 30 and isinstance(loaded.fc1, nn.Sequential)
    _assert_same_state(model, loaded)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_parametrized_weights_are_folded(tmp_path):
    class Mask(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.register_buffer("m", m)

        def forward(self, w):
            return w * self.m

    model = create("lenet-300-100")
    mask = (torch.rand_like(model.fc1.weight) > 0.9).float()
    parametrize.register_parametrization(model.fc1, "weight", Mask(mask))
    effective = model.fc1.weight.detach().clone()
    path = save_checkpoint(model, tmp_path / "p.safetensors", model_name="lenet-300-100")
    assert parametrize.is_parametrized(model.fc1)  # the caller's model is not changed
    loaded, _ = load_checkpoint(path)
    assert not parametrize.is_parametrized(loaded.fc1)
    assert torch.equal(loaded.fc1.weight, effective)
    assert int(torch.count_nonzero(loaded.fc1.weight)) == int(torch.count_nonzero(effective))


def test_custom_sequential_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    _perturb(model)
    path = save_checkpoint(model, tmp_path / "seq.safetensors")
    assert "spec" in read_sidecar(path)["architecture"]
    loaded, _ = load_checkpoint(path)
    _assert_same_state(model, loaded)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_custom_model_with_reference(tmp_path):
    model = _Custom()
    model.body = nn.Sequential(nn.Linear(6, 2, bias=False), nn.Linear(2, 8))  # low-rank body
    _perturb(model)
    path = save_checkpoint(model, tmp_path / "c.safetensors", reference=_Custom())
    arch = read_sidecar(path)["architecture"]
    assert arch["model"] is None and list(arch["replacements"]) == ["body"]
    with pytest.raises(CheckpointError, match="pass a freshly built instance"):
        load_checkpoint(path)
    loaded, _ = load_checkpoint(path, model=_Custom())
    _assert_same_state(model, loaded)
    x = torch.randn(4, 6)
    assert torch.equal(model(x), loaded(x))


def test_custom_model_without_reference_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot describe"):
        save_checkpoint(_Custom(), tmp_path / "c.safetensors")


def _saved(tmp_path):
    model = _perturb(create("lenet-300-100", in_features=64))
    return save_checkpoint(
        model,
        tmp_path / "t.safetensors",
        model_name="lenet-300-100",
        model_kwargs={"in_features": 64},
        metrics={"test_accuracy": 90.0},
    )


def test_tampered_sidecar_metric_is_refused(tmp_path):
    path = _saved(tmp_path)
    side = sidecar_path(path)
    data = json.loads(side.read_text())
    data["metrics"]["test_accuracy"] = 99.9
    side.write_text(json.dumps(data, indent=2))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path)


def test_sidecar_reformatting_is_accepted(tmp_path):
    # the digest is over canonical JSON, so re-indenting the sidecar is not tampering
    path = _saved(tmp_path)
    side = sidecar_path(path)
    side.write_text(json.dumps(json.loads(side.read_text()), indent=7))
    load_checkpoint(path)


def test_tampered_weights_are_refused(tmp_path):
    path = _saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["fc1.weight"][0, 0] += 1.0
    save_file(tensors, str(path), metadata=meta)  # same metadata, changed data
    with pytest.raises(CheckpointError, match="tensor data does not match"):
        load_checkpoint(path)


def test_corrupt_weights_file_is_refused(tmp_path):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)


def test_weights_from_another_checkpoint_are_refused(tmp_path):
    a = _saved(tmp_path / "a")
    b = _saved(tmp_path / "b")
    sidecar_path(b).write_text(sidecar_path(a).read_text().replace("90.0", "90.5"))
    with pytest.raises(CheckpointError):
        load_checkpoint(b)


def test_missing_sidecar_is_explained(tmp_path):
    path = _saved(tmp_path)
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match=r"sidecar '.*t\.json' is missing"):
        load_checkpoint(path)


def test_missing_checkpoint_and_bad_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        save_checkpoint(create("lenet-5"), tmp_path / "x.pt", model_name="lenet-5")


def test_sidecar_not_json(tmp_path):
    path = _saved(tmp_path)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old contents")

    def failing(tmp):
        tmp.write_bytes(b"half-written new cont")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp file left
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    atomic_write(tmp_path / "sub" / "g.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert (tmp_path / "sub" / "g.bin").read_bytes() == b"x"


def test_no_pickle_in_checkpoint(tmp_path):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    assert b"\x80\x04" not in raw[:16] and raw[8:9] == b"{"  # safetensors: u64 + JSON header
    json.loads(sidecar_path(path).read_text())


def test_saving_a_parametrized_model_leaves_it_usable(tmp_path):
    """Regression: folding a deep copy must not strip the original's parametrized class."""
    import torch
    from torch.nn.utils import parametrize

    from nncompress.engine import load_checkpoint, save_checkpoint

    class Half(torch.nn.Module):
        def forward(self, w):
            return w * 0.5

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    parametrize.register_parametrization(model[0], "weight", Half())
    x = torch.randn(5, 4)
    before = model(x)
    save_checkpoint(model, tmp_path / "m.safetensors")
    assert torch.equal(model(x), before)  # the original still works after the save
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(loaded(x), before)
    assert torch.equal(loaded[0].weight, model[0].weight)
