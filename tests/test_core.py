"""core/: the layer selector, progress events, validation messages, module surgery, files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.core import (
    ConfigError,
    LayerSelector,
    NncompressError,
    ProgressEvent,
    atomic_write,
    atomic_write_json,
    check,
    folded_copy,
    progress_task,
    set_submodule,
)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
    )


def test_selector_names_globs_types_and_exclusions():
    net = _net()
    assert list(LayerSelector(types=("Linear",)).select(net)) == ["2.0", "2.1"]
    assert list(LayerSelector(names=["2*"], exclude="2.1").select(net)) == ["2", "2.0"]
    sel = LayerSelector(types=(nn.Conv2d, "Linear"), exclude=("2.0",))
    assert list(sel.select(net)) == ["0", "2.1"]
    assert LayerSelector.from_dict(sel.to_dict()) == sel
    # a predicate, a single glob and a list of names coerce to the same type
    assert list(LayerSelector.coerce(lambda n, m: n == "1").select(net)) == ["1"]
    assert list(LayerSelector.coerce("2.?").select(net)) == ["2.0", "2.1"]
    assert list(LayerSelector.coerce(["0"]).select(net)) == ["0"]
    both = LayerSelector(types=("Linear",)) & ["2.1", "0"]
    assert list(both.select(net)) == ["2.1"]
    assert LayerSelector(types=("Linear",)) & None == LayerSelector(types=("Linear",))


def test_selector_sees_through_parametrizations_and_rejects_bad_fields():
    net = _net()
    torch.nn.utils.parametrize.register_parametrization(net[2][0], "weight", nn.Identity())
    assert "2.0" in LayerSelector(types=("Linear",)).select(net)
    with pytest.raises(ConfigError, match="unknown module type 'Lineer'"):
        LayerSelector(types=("Lineer",))
    with pytest.raises(ConfigError, match="exclude=.*must be names"):
        LayerSelector(exclude=(3,))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['name'\]"):
        LayerSelector.from_dict({"name": "fc1"})


def test_progress_task_reports_start_advance_and_end_even_on_error():
    events: list[ProgressEvent] = []
    with pytest.raises(RuntimeError):
        with progress_task(events.append, "loop", total=3) as task:
            task.advance(layer="a")
            task.advance(3)
            raise RuntimeError("boom")
    assert [(e.kind, e.completed) for e in events] == [("start", 0), ("advance", 1),
                                                       ("advance", 3), ("end", 0)]  # fmt: skip
    assert events[1].info == {"layer": "a"} and events[1].total == 3
    with progress_task(None, "quiet", 2) as task:  # no callback: nothing happens
        task.advance()


def test_check_message_names_field_value_and_layer():
    check(True, "bits", 3, "must be in [1, 8]")
    with pytest.raises(ConfigError, match=r"^bits=40 for layer 'fc1': must be in \[1, 8\]$"):
        check(False, "bits", 40, "must be in [1, 8]", "fc1")
    assert issubclass(ConfigError, NncompressError) and issubclass(ConfigError, ValueError)


def test_set_submodule_and_folded_copy():
    net = _net()
    set_submodule(net, "2.1", nn.Identity())
    assert isinstance(net[2][1], nn.Identity)
    torch.nn.utils.parametrize.register_parametrization(
        net[0], "weight", type("Zero", (nn.Module,), {"forward": lambda self, w: w * 0})()
    )
    plain = folded_copy(net)
    assert torch.count_nonzero(plain[0].weight) == 0
    assert torch.nn.utils.parametrize.is_parametrized(net[0])  # the original is untouched


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    assert path.read_text() == '{"x": 1}'

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_text() == '{"x": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_trace_names_the_failing_module_and_op_kind_classifies():
    import torch.nn.functional as F  # noqa: N812

    from nncompress.core.fx import TraceError, op_kind, trace

    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gate = nn.Linear(4, 4), Gate()

        def forward(self, x):
            return self.gate(self.fc(x))

    with pytest.raises(TraceError, match="in module 'gate'") as info:
        trace(Net())
    assert info.value.module == "gate" and isinstance(info.value, ValueError)

    class Ops(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act, self.pool = nn.BatchNorm1d(4), nn.ReLU6(), nn.AdaptiveAvgPool1d(1)

        def forward(self, x):
            y = F.relu(self.bn(x)) + torch.sigmoid(x)
            return self.pool(self.act(y.view(y.size(0), 4, -1))).flatten(1)

    gm = trace(Ops())
    mods = dict(gm.named_modules())
    kinds = [op_kind(n, mods) for n in gm.graph.nodes]
    assert kinds == ["placeholder", "batchnorm", "relu", "activation", "add", "shape", "reshape",
                     "relu6", "adaptive_avgpool", "flatten", "output"]  # fmt: skip
