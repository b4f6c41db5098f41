"""ECSQ (quant/ecsq.py): lambda = 0 is k-means, the rate falls as lambda grows, the assignment
matches a plain-loop reference, rate-distortion pruning, the Fisher importance against a
hand computation, and the model transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError
from nncompress.quant.ecsq import (
    ECSQConfig,
    ECSQuantizer,
    _assign,
    ecsq_1d,
    ecsq_share_,
    fisher_importance,
    rate_bits,
)
from nncompress.quant.kmeans import kmeans_1d, shared_layers


def _weights(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.laplace(0, 0.05, n), rng.normal(0, 0.2, n // 10)])


def test_lambda_zero_is_kmeans():
    x = _weights()
    c, labels, info = ecsq_1d(x, 16, 0.0)
    cb, lab = kmeans_1d(torch.from_numpy(x), 16)
    inertia = float(((x - cb.double().numpy()[lab.numpy()]) ** 2).sum())
    assert info["distortion"] == pytest.approx(inertia, rel=1e-9)
    np.testing.assert_allclose(np.sort(c), np.sort(np.unique(cb.double().numpy())), rtol=1e-9)


def test_rate_falls_and_distortion_rises_with_lambda():
    x = _weights()
    rates, dists = [], []
    for lam in (0.0, 1e-4, 1e-3, 1e-2):
        _, labels, info = ecsq_1d(x, 32, lam)
        assert info["rate_bits"] == pytest.approx(rate_bits(labels, labels.max() + 1))
        rates.append(info["rate_bits"])
        dists.append(info["distortion"])
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert all(a < b for a, b in zip(dists, dists[1:], strict=False))
    # at equal rate, ECSQ's distortion beats k-means with fewer clusters (the point of ECSQ)
    _, _, info = ecsq_1d(x, 32, 1e-3)
    for k in (2, 4, 8, 16, 32):
        _, lab, km = ecsq_1d(x, k, 0.0)
        if km["rate_bits"] <= info["rate_bits"]:
            assert info["distortion"] <= km["distortion"] * 1.001


def test_assignment_matches_plain_loop():
    rng = np.random.default_rng(3)
    x, a = rng.normal(size=300), rng.uniform(0.1, 2, 300)
    c, cost = np.sort(rng.normal(size=7)), rng.uniform(0, 5, 7)
    cost[2] = np.inf
    got = _assign(x, a, c, cost, 0.3)
    want = [
        min(range(7), key=lambda j: a[i] * (x[i] - c[j]) ** 2 + 0.3 * cost[j]) for i in range(300)
    ]
    assert got.tolist() == want


def test_importance_pulls_centroids_to_important_weights():
    x = np.array([0.0, 1.0] * 50)
    a = np.array([1.0, 100.0] * 50)
    c, labels, _ = ecsq_1d(x, 1, 0.0, importance=a)
    assert c[0] == pytest.approx(100.0 / 101.0)  # the weighted mean


def test_rate_distortion_pruning():
    x = _weights()
    _, labels0, _ = ecsq_1d(x, 16, 0.0, prune=True, density=0.1)
    _, labels1, info = ecsq_1d(x, 16, 1e-3, prune=True, density=0.1)
    assert (labels0 < 0).sum() < (labels1 < 0).sum()
    pruned = np.abs(x[labels1 < 0])
    kept = np.abs(x[labels1 >= 0])
    assert pruned.max() < np.quantile(kept, 0.5)  # only small weights are dropped
    assert info["pruned"] == (labels1 < 0).sum()
    q = ECSQuantizer(k=16, lam=1e-3, prune=True, density=0.1).fit(x)
    np.testing.assert_array_equal(q.labels_, labels1)
    assert (q.reconstruct()[labels1 < 0] == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="lam"):
        ecsq_1d([1.0, 2.0], 2, -1.0)
    with pytest.raises(ValueError, match="importance"):
        ecsq_1d([1.0, 2.0], 2, 0.1, importance=[1.0])
    with pytest.raises(ConfigError, match="importance"):
        ECSQConfig(importance="hessian")
    with pytest.raises(ConfigError, match="lam"):
        ECSQConfig(lam=float("nan"))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def test_fisher_matches_hand_computation():
    torch.manual_seed(0)
    net = _Net()
    batches = _data()
    fisher = fisher_importance(net, batches, batches=3)
    want = torch.zeros_like(net.fc1.weight)
    for x, y in batches[:3]:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        want += net.fc1.weight.grad**2
    torch.testing.assert_close(fisher["fc1"], want / 3)
    assert set(fisher) == {"fc1", "fc2"}


def test_ecsq_share_installs_shared_weights():
    torch.manual_seed(1)
    net = _Net()
    with torch.no_grad():
        net.fc1.weight[net.fc1.weight.abs() < 0.1] = 0.0
    zeros = net.fc1.weight == 0
    fisher = fisher_importance(net, _data(), batches=2)
    rep = ecsq_share_(net, ECSQConfig(bits_fc=3, lam=1e-7, prune=True), importance=fisher)
    assert set(shared_layers(net)) == {"fc1", "fc2"}
    w = net.fc1.weight.detach()
    assert (w[zeros] == 0).all()  # pruned weights stay pruned
    assert torch.unique(w[w != 0]).numel() <= 8
    assert {r.name for r in rep.layers} == {"fc1", "fc2"}
    gone = _Net()  # a huge lambda prunes a sparse layer away without failing
    with torch.no_grad():
        gone.fc1.weight[gone.fc1.weight.abs() < 0.3] = 0.0
    ecsq_share_(gone, ECSQConfig(lam=1e3, prune=True), importance=fisher)
    assert (gone.fc1.weight == 0).all()
    with pytest.raises(ConfigError, match="fisher"):
        ecsq_share_(_Net(), ECSQConfig())
    net2 = _Net()
    ecsq_share_(net2, ECSQConfig(bits_fc=2, lam=0.5, importance="none"))
    assert torch.unique(net2.fc2.weight.detach()).numel() <= 4
