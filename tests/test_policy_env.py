"""Policy search environment: layer embedding, the Policy object and the transforms taking it,
the proxy (with the least-squares reconstruction of the next layer)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.data.datasets import BatchLoader
from nncompress.engine import ConfigError, evaluate
from nncompress.policy import ActionsConfig, Policy, ProxyConfig, SearchConfig
from nncompress.policy.units import CRITERIA
from nncompress.prune import (
    FilterPruneConfig,
    MagnitudeConfig,
    prune_,
    prune_filters_,
    pruning_masks,
)
from nncompress.prune.reconstruct import reconstruct_, reconstruction_data
from nncompress.prune.structured import CRITERIA as STRUCTURED_CRITERIA
from nncompress.quant import KMeansConfig, share_weights_
from nncompress.quant.kmeans import shared_layers
from nncompress.stages.search_model import ModelProblem, build_space, evaluate_candidate
from prune_nets import ResNet18ish


def _hand_net() -> nn.Sequential:
    # 1x8x8 -> conv(1->4, 3x3, pad 1) -> 4x8x8 -> conv(4->6, 3x3, stride 2, pad 1) -> 6x4x4
    # -> flatten (96) -> Linear(96 -> 5)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, 1, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, 2, 1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(96, 5),
    )


def test_layer_embedding_of_a_hand_made_net():
    torch.manual_seed(0)
    net = _hand_net()
    space = build_space(net, torch.randn(2, 1, 8, 8), ActionsConfig(min_keep=0.25))
    assert [u.name for u in space.units] == ["0", "2"]  # the Linear's outputs are fixed
    assert [(u.lo, u.hi, u.full) for u in space.units] == [(1, 4, 4), (2, 6, 6)]
    # dense MACs: conv1 64*4*9 = 2304, conv2 16*6*4*9 = 3456, fc 96*5 = 480 (total 6240)
    # unit MACs (layers whose width the unit changes): conv1+conv2 = 5760, conv2+fc = 3936
    np.testing.assert_array_equal(space.unit_macs, [5760, 3936])
    # static features (t, kind, type, c_in, c_out, h*w, stride, kernel, MACs), min-max scaled
    # over the two units: (0,0,0,1,4,64,1,3,5760) and (1,0,0,4,6,16,2,3,3936)
    s0 = space.state(0, space.dense_q(), 1.0)
    np.testing.assert_allclose(s0, [0, 0, 0, 0, 0, 1, 0, 0, 1, 0.0, 3936 / 6240, 1.0])
    # after unit 0 keeps 2 of 4 channels: conv1 64*2*9 = 1152, conv2 16*6*2*9 = 1728, fc 480
    q = space.dense_q()
    q[0] = 2
    s1 = space.state(1, q, 0.5)
    reduced = (6240 - (1152 + 1728 + 480)) / 6240
    np.testing.assert_allclose(s1, [1, 0, 0, 1, 1, 0, 1, 0, 0, reduced, 0.0, 0.5])
    roll = space.rollout(lambda t, s: [0.5, 1.0][t])
    np.testing.assert_array_equal(roll.q, [2, 6])
    np.testing.assert_allclose(roll.states[1], s1)


def test_policy_json_round_trip_and_validation(tmp_path):
    pol = Policy(
        filter={"a": 0.25, "b": 0.25}, sparsity={"fc": 0.9}, bits={"fc": 5}, info={"agent": "ddpg"}
    )
    assert Policy.from_dict(json.loads(json.dumps(pol.to_dict()))) == pol
    pol.save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json") == pol
    with pytest.raises(ConfigError, match=r"filter\['a'\]=1.5: must be a number in \[0, 1\)"):
        Policy(filter={"a": 1.5})
    with pytest.raises(ConfigError, match=r"bits\['x'\]=0"):
        Policy(bits={"x": 0})
    with pytest.raises(ConfigError, match="unknown field"):
        Policy.from_dict({"filters": {}})
    with pytest.raises(ConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        Policy.load(tmp_path / "bad.json")


def test_policy_configs_of_each_family():
    pol = Policy(filter={"a": 0.5}, sparsity={"fc": 0.9}, bits={"fc": 4}, criterion="l2")
    assert FilterPruneConfig.from_policy(pol) == FilterPruneConfig(
        per_layer={"a": 0.5}, criterion="l2"
    )
    assert MagnitudeConfig.from_policy(pol).layer_rule("fc") == ("sparsity", 0.9)
    assert KMeansConfig.from_policy(pol).per_layer == {"fc": 4}
    with pytest.raises(ConfigError, match="policy.filter is empty"):
        FilterPruneConfig.from_policy(Policy(sparsity={"fc": 0.5}))
    with pytest.raises(ConfigError, match="criterion='l7'"):
        FilterPruneConfig.from_policy(Policy(filter={"a": 0.5}, criterion="l7"))
    assert CRITERIA == STRUCTURED_CRITERIA  # the policy family repeats prune's list


def test_transforms_accept_a_policy_like_their_configs():
    torch.manual_seed(0)
    model = ResNet18ish().eval()
    x = torch.randn(2, 3, 16, 16)
    space = build_space(model, x, ActionsConfig(sparsity=True, bits=(3, 5)))
    q = space.rollout(lambda t, s: 0.6).q
    pol = space.policy(q)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = prune_filters_(a, pol, x)
    rb = prune_filters_(b, FilterPruneConfig(per_layer=dict(pol.filter)), x)
    assert ra.plan == rb.plan and ra.macs_after == rb.macs_after
    prune_(a, pol)
    prune_(
        b,
        MagnitudeConfig(
            sparsity=0.0, per_layer={k: {"sparsity": v} for k, v in pol.sparsity.items()}
        ),
        filter=lambda n, m: n in pol.sparsity,
    )
    assert set(pruning_masks(a)) == set(pol.sparsity)
    for n, mask in pruning_masks(a).items():
        assert torch.equal(mask, pruning_masks(b)[n])
    share_weights_(a, pol)
    share_weights_(b, KMeansConfig(per_layer=dict(pol.bits)), filter=lambda n, m: n in pol.bits)
    assert set(shared_layers(a)) == set(pol.bits)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_reconstruction_matches_least_squares_and_lowers_the_error():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
    x = torch.randn(6, 3, 10, 10)
    data = reconstruction_data(ref, x, ["2"], points_per_image=20, seed=0)
    assert data.targets["2"].shape == (120, 5)
    pruned = copy.deepcopy(ref)
    keep = [0, 2, 3, 5, 7]
    pruned[0] = nn.Conv2d(3, 5, 3, padding=1)
    pruned[0].weight.data = ref[0].weight.data[keep].clone()
    pruned[0].bias.data = ref[0].bias.data[keep].clone()
    pruned[2] = nn.Conv2d(5, 5, 3, padding=1)
    pruned[2].weight.data = ref[2].weight.data[:, keep].clone()
    pruned[2].bias.data = ref[2].bias.data.clone()
    res = reconstruct_(pruned, data, ["2"], ridge=0.0)
    assert res[0].applied and res[0].error_after < res[0].error_before
    # reference: numpy least squares on unfolded patches at the same positions
    z = torch.relu(pruned[0](x)).detach()
    cols = torch.nn.functional.unfold(z, 3, padding=1)  # (B, 45, 100)
    pos = data.positions["2"]
    rows = cols.gather(2, pos[:, None, :].expand(-1, 45, -1)).transpose(1, 2).reshape(-1, 45)
    a = np.concatenate([rows.double().numpy(), np.ones((rows.shape[0], 1))], 1)
    sol, *_ = np.linalg.lstsq(a, data.targets["2"].numpy(), rcond=None)
    np.testing.assert_allclose(
        pruned[2].weight.detach().reshape(5, -1).double().numpy(), sol[:45].T, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(pruned[2].bias.detach().double().numpy(), sol[45], atol=1e-5)


def test_proxy_without_refit_equals_the_policy_applied_by_the_transforms(digits_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    ).eval()
    d = digits_data
    x = d.val[0][:2]
    cfg = ProxyConfig(val_samples=10_000, refit=False)
    search_cfg = SearchConfig(budgets="macs=0.5", actions=ActionsConfig(sparsity=True), proxy=cfg)
    problem = ModelProblem.build(model, d.train, d.val, search_cfg, example_input=x)
    space = problem.space
    q = space.rollout(lambda t, s: 0.7).q
    res = evaluate_candidate(problem.shared, problem.candidate(q))
    m = copy.deepcopy(model)
    pol = space.policy(q)
    prune_filters_(m, pol, x)
    prune_(m, pol)
    ref = evaluate(m, BatchLoader(*d.val, 250))
    assert res["accuracy"] == ref["accuracy"]
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # with the refit the proxy sees the same channels, refitted; the budget is unchanged
    problem2 = ModelProblem.build(
        model,
        d.train,
        d.val,
        search_cfg.replace(proxy=ProxyConfig(val_samples=10_000)),
        example_input=x,
    )
    assert problem2.shared.recon is not None and "3" in problem2.shared.recon.targets
    res2 = evaluate_candidate(problem2.shared, problem2.candidate(q))
    assert res2["refit_error"] is not None and res2["refit_error"] < 1.0
