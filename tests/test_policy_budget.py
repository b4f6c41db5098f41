"""Policy search budgets: parsing, the exact cost model, AMC's clipped actions (hypothesis)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nncompress.engine import ConfigError
from nncompress.io import EncodeConfig, encode_state_dict
from nncompress.models import create
from nncompress.policy import ActionsConfig, ActionSpace, Budget, parse_budgets
from nncompress.prune import prune_, prune_filters_
from nncompress.quant import share_weights_
from nncompress.stages.search_model import build_space
from nncompress.stats import count_macs, model_stats
from prune_nets import InceptionNet, ResNet18ish


def test_parse_budgets():
    b = parse_budgets("macs=0.5, params=0.25,latency@64=0.8")
    assert b == (Budget("macs", 0.5), Budget("params", 0.25), Budget("latency", 0.8, 64))
    assert str(b[2]) == "latency@64=0.8"
    with pytest.raises(ConfigError, match="unknown metric 'flops'"):
        parse_budgets("flops=0.5")
    with pytest.raises(ConfigError, match=r"macs=1.5: must be a fraction in \(0, 1\]"):
        parse_budgets("macs=1.5")
    with pytest.raises(ConfigError, match="given twice"):
        parse_budgets("macs=0.5,macs=0.4")
    with pytest.raises(ConfigError, match="METRIC=FRACTION"):
        parse_budgets("macs")
    with pytest.raises(ConfigError, match="batch size applies to latency only"):
        Budget("macs", 0.5, batch=64)
    with pytest.raises(ConfigError, match="at least one"):
        parse_budgets("")


def _params_kept(m: nn.Module) -> int:
    """Parameters with the pruned (zero) Conv/Linear weights not counted."""
    total = model_stats(m).params
    zeros = sum(
        int((mod.weight == 0).sum())
        for mod in m.modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))
    )
    return total - zeros


def _apply(model, space, q, x):
    pol = space.policy(q)
    m = copy.deepcopy(model)
    if pol.filter:
        prune_filters_(m, pol, x)
    if pol.sparsity:
        prune_(m, pol)
    if pol.bits:
        share_weights_(m, pol)
    return m


@pytest.mark.parametrize(
    "make,shape",
    [
        (ResNet18ish, (3, 16, 16)),
        (InceptionNet, (3, 8, 8)),
        (lambda: create("lenet-5"), (1, 28, 28)),
    ],
)
def test_cost_model_matches_the_pruned_model(make, shape):
    """MACs and params predicted for random assignments equal those of the transformed model
    (filter pruning through the Policy, then connection pruning)."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, *shape)
    space = build_space(model, x, ActionsConfig(sparsity=True))
    rng = np.random.default_rng(1)
    for _ in range(3):
        q = space.rollout(lambda t, s: rng.uniform()).q
        pruned = _apply(model, space, q, x)
        st_ = model_stats(pruned, shape)
        cost = space.costs(q)
        assert cost["macs"] == st_.macs_nonzero
        assert cost["params"] == _params_kept(pruned)
        dense = sum(v[0] for v in count_macs(pruned, shape).values())
        assert cost["dense_macs"] == dense


def test_bytes_estimate_is_the_fixed_width_file_size():
    """The ``bytes`` estimate is within 0.5% of the real .ncz written with fixed-width codes
    (and an upper bound of the Huffman-coded file)."""
    torch.manual_seed(0)
    model = create("lenet-300-100")
    x = torch.randn(2, 1, 28, 28)
    space = build_space(model, x, ActionsConfig(filter=False, sparsity=True, bits=(2, 4, 5, 8)))
    raw, _ = encode_state_dict(model, EncodeConfig(codec="raw"))
    assert space.reference["bytes"] == pytest.approx(len(raw), rel=5e-3)
    rng = np.random.default_rng(0)
    for _ in range(2):
        q = space.rollout(lambda t, s: rng.uniform()).q
        m = _apply(model, space, q, x)
        est = space.costs(q)["bytes"]
        raw, _ = encode_state_dict(m, EncodeConfig(codec="raw"))
        huff, _ = encode_state_dict(m, EncodeConfig(codec="huffman"))
        assert est == pytest.approx(len(raw), rel=5e-3)
        assert len(huff) < est


def test_unreachable_budget_is_rejected_before_any_episode():
    model = ResNet18ish()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(
        ConfigError, match=r"budget macs=0.01: unreachable.*keeps 0\.\d+ of the macs"
    ):
        build_space(model, x, ActionsConfig(), parse_budgets("macs=0.01"))
    with pytest.raises(ConfigError, match="latency: needs filter actions"):
        build_space(
            model, x, ActionsConfig(filter=False, sparsity=True), parse_budgets("latency=0.5")
        )


# ---- AMC's clipped actions: the budget always holds (hypothesis) -------------------------------

_SPACE: dict = {}


def _space() -> ActionSpace:
    if "s" not in _SPACE:
        torch.manual_seed(0)
        model = ResNet18ish().eval()
        _SPACE["x"] = torch.randn(2, 3, 16, 16)
        _SPACE["model"] = model
        _SPACE["s"] = build_space(
            model, _SPACE["x"], ActionsConfig(sparsity=True, bits=(2, 4, 8), storage_bits=8)
        )
    return _SPACE["s"]


@settings(max_examples=60, deadline=None)
@given(
    metrics=st.lists(
        st.sampled_from(["macs", "params", "bytes"]), min_size=1, max_size=3, unique=True
    ),
    fractions=st.lists(st.floats(0.02, 1.0), min_size=3, max_size=3),
    actions=st.lists(st.floats(0.0, 1.0), min_size=64, max_size=64),
)
def test_clipped_actions_always_meet_the_budgets(metrics, fractions, actions):
    base = _space()
    budgets = [Budget(m, f) for m, f in zip(metrics, fractions, strict=False)]
    floor = base.fractions(base.min_q())
    if any(floor[b.metric] > b.fraction for b in budgets):
        with pytest.raises(ConfigError, match="unreachable"):
            base.with_budgets(budgets)
        return
    space = base.with_budgets(budgets)
    roll = space.rollout(lambda t, s: actions[t % len(actions)])
    q = roll.q
    assert space.feasible(q)
    fr = space.fractions(q)
    for b in budgets:
        assert fr[b.metric] <= b.fraction * (1 + 1e-12)
    # AMC's wall: each kept count is the agent's own, or the largest one that keeps the budget
    # reachable with every later unit at its minimum
    for t, u in enumerate(space.units):
        want = u.q_of(roll.actions[t])
        assert u.lo <= q[t] <= want
        if q[t] < want:
            trial = q.copy()
            trial[t + 1 :] = space.min_q()[t + 1 :]
            trial[t] = q[t] + 1
            assert not space.feasible(trial)


def test_clipped_policy_meets_the_budget_on_the_real_model():
    base = _space()
    space = base.with_budgets(parse_budgets("macs=0.4,params=0.5"))
    rng = np.random.default_rng(3)
    for _ in range(3):
        q = space.rollout(lambda t, s: rng.uniform()).q
        m = _apply(_SPACE["model"], space, q, _SPACE["x"])
        st_ = model_stats(m, (3, 16, 16))
        ref = model_stats(_SPACE["model"], (3, 16, 16))
        assert st_.macs_nonzero <= 0.4 * ref.macs
        assert _params_kept(m) <= 0.5 * ref.params


def test_latency_budget_fits_a_model_and_is_enforced(monkeypatch):
    # Deterministic timings (1 ms fixed + 1e-6 ms per MAC) instead of wall-clock measurements,
    # which on a loaded 2-core machine made the fitted model (and the test) depend on the load.
    import nncompress.stages.search_model as sm

    def fake_latency(model, shape, batch, **kw):
        macs = sum(v[0] for v in count_macs(model, shape).values())
        return 1.0 + 1e-6 * macs

    monkeypatch.setattr(sm, "measure_latency", fake_latency)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    x = torch.randn(2, 3, 16, 16)
    space = build_space(net, x, ActionsConfig(), parse_budgets("latency=0.7"), latency_repeats=3)
    lm = space.cost.latency[1]
    assert lm.ms_per_mac > 0 and len(lm.points) == 4
    q = space.rollout(lambda t, s: 1.0).q
    assert space.fractions(q)["latency@1"] <= 0.7 + 1e-12
