"""Low-rank decomposition: tensor functions against numpy/torch references, exact full-rank
reproduction for every method, cost formulas against count_macs, rank rules, EVBMF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError
from nncompress.lowrank import (
    DecomposeConfig,
    TTLinear,
    cp_conv,
    decompose_,
    evbmf,
    factorize,
    rank_for_energy,
    separable_conv,
    svd_linear,
    truncated_svd,
    tt_linear,
    tucker2,
    tucker2_conv,
    tucker2_vbmf_ranks,
)
from nncompress.lowrank.cp import cp_cost
from nncompress.lowrank.separable import separable_cost, separable_full_rank, separable_matrix
from nncompress.lowrank.tt import tt_cost, tt_full_ranks
from nncompress.lowrank.tucker import tucker2_cost
from nncompress.stats import count_macs


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on shared cores
    yield
    torch.set_num_threads(n)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _macs(m: nn.Module, shape: tuple[int, ...]) -> int:
    return sum(v[0] for v in count_macs(m, shape).values())


CONVS = [
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=5, out_channels=7, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2, bias=False),
]


# ------------------------------------------------------------------ SVD


def test_truncated_svd_is_eckart_young_optimum():
    g = np.random.default_rng(0)
    w = g.normal(size=(30, 20))
    s = np.linalg.svd(w, compute_uv=False)
    for r in (1, 5, 20):
        a, b = truncated_svd(torch.from_numpy(w), r)
        assert a.shape == (r, 20) and b.shape == (30, r)
        err = np.linalg.norm(w - (b @ a).numpy())
        assert err == pytest.approx(np.sqrt((s[r:] ** 2).sum()), abs=1e-9)


def test_svd_linear_full_rank_and_structure():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    x = torch.randn(7, 20)
    seq = svd_linear(lin, 12)
    assert [type(m) for m in seq] == [nn.Linear, nn.Linear] and seq[0].bias is None
    torch.testing.assert_close(seq(x), lin(x), atol=1e-5, rtol=1e-5)
    assert _n_params(svd_linear(lin, 3)) == 3 * (20 + 12) + 12


def test_truncated_svd_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank=0"):
        truncated_svd(torch.randn(4, 3), 0)


# ------------------------------------------------------------------ spatially separable


def test_separable_matrix_layout():
    w = torch.randn(3, 2, 4, 5)
    m = separable_matrix(w)
    assert m.shape == (2 * 4, 3 * 5)
    assert m[1 * 4 + 2, 2 * 5 + 3] == w[2, 1, 2, 3]


@pytest.mark.parametrize("kw", CONVS)
def test_separable_full_rank_reproduces_conv(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, kw["in_channels"], 13, 15)
    sep = separable_conv(conv, separable_full_rank(conv))
    torch.testing.assert_close(sep(x), conv(x), atol=1e-4, rtol=1e-4)


def test_separable_rank_r_is_svd_of_reshaped_kernel():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    r = 2
    sep = separable_conv(conv, r)
    # the effective kernel of the pair equals the rank-r SVD truncation of the reshaped kernel
    u, s, vh = torch.linalg.svd(separable_matrix(conv.weight.detach()).double())
    m_r = (u[:, :r] * s[:r]) @ vh[:r]  # (C*kh, N*kw)
    w_r = m_r.reshape(4, 3, 5, 3).permute(2, 0, 1, 3).float()  # (N, C, kh, kw)
    x = torch.randn(1, 4, 9, 9)
    ref = nn.functional.conv2d(x, w_r, padding=1)
    torch.testing.assert_close(sep(x), ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ Tucker-2


@pytest.mark.parametrize("kw", CONVS)
def test_tucker2_full_rank_reproduces_conv(kw):
    torch.manual_seed(3)
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, kw["in_channels"], 13, 15)
    block = tucker2_conv(conv, (kw["out_channels"], kw["in_channels"]))
    assert [m.kernel_size for m in block] == [(1, 1), conv.kernel_size, (1, 1)]
    torch.testing.assert_close(block(x), conv(x), atol=1e-4, rtol=1e-4)


def test_tucker2_exact_on_low_multilinear_rank_kernel():
    g = torch.Generator().manual_seed(4)
    core = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    u0 = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))[0]
    u1 = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("abij,na,cb->ncij", core, u0, u1)  # (8, 6, 3, 3)
    g_core, f0, f1 = tucker2(w, (3, 2))
    rec = torch.einsum("abij,na,cb->ncij", g_core, f0, f1)
    torch.testing.assert_close(rec, w, atol=1e-10, rtol=1e-10)
    # orthonormal factors, as HOOI produces
    torch.testing.assert_close(f0.t() @ f0, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)


# ------------------------------------------------------------------ CP


def test_cp_reproduces_conv_with_exact_cp_rank_kernel():
    g = torch.Generator().manual_seed(5)
    rank = 3
    factors = [torch.randn(d, rank, generator=g) for d in (6, 4, 3, 3)]
    conv = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ar,br,cr,dr->abcd", *factors))
    block = cp_conv(conv, rank, n_iter_max=500)
    assert [m.groups for m in block] == [1, rank, rank, 1]
    x = torch.randn(2, 4, 11, 10)
    ref = conv(x)
    torch.testing.assert_close(block(x), ref, atol=1e-3 * ref.abs().max().item(), rtol=1e-3)


# ------------------------------------------------------------------ tensor train


def test_factorize_products_and_balance():
    assert sorted(factorize(784, 4)) == [4, 4, 7, 7]
    for n, d in [(300, 3), (10, 3), (97, 2), (1, 3), (4096, 4)]:
        f = factorize(n, d)
        assert len(f) == d and math.prod(f) == n


def test_tt_full_rank_reproduces_linear():
    torch.manual_seed(6)
    lin = nn.Linear(24, 30)
    ins, outs = factorize(24, 3), factorize(30, 3)
    tt = tt_linear(lin, ins, outs, tt_full_ranks(ins, outs))
    x = torch.randn(5, 24)
    torch.testing.assert_close(tt(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tt.full_weight(), lin.weight, atol=1e-5, rtol=1e-5)
    # cores are parameters of the TTLinear itself, not children
    assert list(tt.children()) == []
    assert {n for n, _ in tt.named_parameters()} == {"core0", "core1", "core2", "bias"}


def test_tt_forward_matches_dense_reconstruction_and_cost():
    torch.manual_seed(7)
    tt = TTLinear([4, 7], [5, 3], [3])
    w = torch.einsum("aijb,bklc->ikjl", tt.core0, tt.core1).reshape(28, 15)  # (in, out)
    x = torch.randn(3, 28)
    torch.testing.assert_close(tt(x), x @ w + tt.bias, atol=1e-5, rtol=1e-5)
    params, macs = tt_cost([4, 7], [5, 3], [3], True, positions=1)
    assert params == _n_params(tt)
    # contractions: core0 (1*4*5*3) x Z=7, then core1 (3*7*3*1) x P=5
    assert macs == 60 * 7 + 63 * 5
    # count_macs sees TTLinear layers (one sample of 2 x 28 rows: 2 rows)
    net = nn.Sequential(tt, nn.ReLU(), nn.Linear(15, 4))
    assert count_macs(net, (2, 28)) == {"0": (2 * macs, 2 * macs), "2": (2 * 60, 2 * 60)}


def test_tt_truncation_error_decreases_with_rank():
    torch.manual_seed(8)
    lin = nn.Linear(64, 36)
    errs = []
    for r in (1, 4, 16):
        tt = tt_linear(lin, [8, 8], [6, 6], r)
        errs.append(float((tt.full_weight() - lin.weight).detach().norm()))
    assert errs[0] > errs[1] > errs[2]


# ------------------------------------------------------------------ cost formulas vs count_macs


@pytest.mark.parametrize("kw", CONVS)
def test_cost_formulas_match_built_modules(kw):
    torch.manual_seed(9)
    conv = nn.Conv2d(**kw)
    shape = (kw["in_channels"], 13, 15)
    with torch.no_grad():
        out_hw = tuple(conv(torch.zeros(1, *shape)).shape[-2:])
    in_hw = shape[1:]
    for build, cost, rank in [
        (separable_conv, separable_cost, 2),
        (tucker2_conv, tucker2_cost, (3, 2)),
        (lambda c, r: cp_conv(c, r, n_iter_max=5), cp_cost, 4),
    ]:
        block = build(conv, rank)
        params, macs = cost(conv, rank, in_hw, out_hw)
        assert params == _n_params(block)
        assert macs == _macs(block, shape)


# ------------------------------------------------------------------ rank rules


def test_rank_for_energy_matches_numpy_cumsum():
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    frac = np.cumsum(s**2) / np.sum(s**2)
    for e in (0.1, 0.6, 0.9, 0.99, 1.0):
        assert rank_for_energy(torch.tensor(s), e) == int(np.argmax(frac >= e - 1e-12)) + 1


def _low_rank_plus_noise(l_: int, m: int, r: int, sigma: float, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    u = np.linalg.qr(g.normal(size=(l_, r)))[0]
    v = np.linalg.qr(g.normal(size=(m, r)))[0]
    s = np.linspace(3.0, 6.0, r) * sigma * np.sqrt(max(l_, m))
    return u @ np.diag(s) @ v.T + sigma * g.normal(size=(l_, m))


@pytest.mark.parametrize(("shape", "rank", "sigma"), [((40, 60), 4, 0.5), ((100, 50), 7, 1.0)])
def test_evbmf_recovers_known_rank_and_noise(shape, rank, sigma):
    y = _low_rank_plus_noise(*shape, rank, sigma, seed=rank)
    res = evbmf(y)
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(sigma**2, rel=0.1)
    # with the true noise variance the rank is the same, and pure noise gives rank 0
    assert evbmf(y, sigma2=sigma**2).rank == rank
    noise = np.random.default_rng(1).normal(size=shape)
    assert evbmf(noise, sigma2=1.0).rank == 0
    # kept singular values are shrunk, never inflated
    assert np.all(res.shrunk[:rank] < res.singular_values[:rank])


def test_tucker2_vbmf_ranks_on_low_rank_kernel():
    g = np.random.default_rng(3)
    core = g.normal(size=(5, 3, 3, 3)) * 10
    u0, u1 = g.normal(size=(32, 5)), g.normal(size=(24, 3))
    w = np.einsum("abij,na,cb->ncij", core, u0, u1) + 0.1 * g.normal(size=(32, 24, 3, 3))
    assert tucker2_vbmf_ranks(torch.from_numpy(w)) == (5, 3)


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="svd"), "exactly one of"),
        (dict(method="svd", rank=2, energy=0.9), "exactly one of"),
        (dict(method="qr", rank=2), "method='qr'"),
        (dict(method="svd", rank=0), "rank=0"),
        (dict(method="svd", energy=1.2), r"energy=1.2: must be in \(0, 1\]"),
        (dict(method="cp", energy=0.9), "needs singular values"),
        (dict(method="tt", vbmf=True), "needs singular values"),
        (dict(method="svd", rank=2, per_layer={"fc1": {"sparsity": 1}}), "unknown key"),
        (
            dict(method="svd", rank=2, per_layer={"fc1": {"rank": -1}}),
            r"per_layer\['fc1'\]: rank=-1",
        ),
        (dict(method="tt", rank=2, tt_in_modes=(4, 4)), "give both"),
    ],
)
def test_config_errors_name_field_and_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DecomposeConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = DecomposeConfig(method="tt", rank=4, tt_in_modes=(4, 7), tt_out_modes=(5, 6))
    assert DecomposeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        DecomposeConfig.from_dict({"method": "svd", "rank": 2, "ranks": 3})


def test_macs_budget_needs_input_shape():
    with pytest.raises(ConfigError, match="needs input_shape"):
        decompose_(nn.Sequential(nn.Linear(4, 4)), DecomposeConfig(method="svd", macs_budget=0.5))


def test_bad_tt_modes_raise_before_work():
    model = nn.Sequential(nn.Linear(24, 30))
    cfg = DecomposeConfig(method="tt", rank=2, tt_in_modes=(4, 5), tt_out_modes=(5, 6))
    with pytest.raises(ConfigError, match="products must equal"):
        decompose_(model, cfg)
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize(
    "stride,padding,dilation,bias", [(1, 1, 1, True), (2, 0, 1, False), (1, 2, 2, True)]
)
def test_tt_conv_full_rank_reproduces_the_conv(stride, padding, dilation, bias):
    from nncompress.lowrank import tt_conv
    from nncompress.lowrank.tt import tt_full_ranks

    torch.manual_seed(11)
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    ins, outs = [9, 2, 3], [1, 2, 4]
    layer = tt_conv(conv, ins, outs, tt_full_ranks(ins, outs))
    x = torch.randn(2, 6, 11, 11)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.full_weight(), conv.weight, atol=1e-5, rtol=1e-4)
    # low rank: fewer parameters, still the conv's output shape
    small = tt_conv(conv, ins, outs, 2)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in conv.parameters())
    assert small(x).shape == conv(x).shape
    with pytest.raises(ValueError, match="groups=2"):
        tt_conv(nn.Conv2d(4, 4, 3, groups=2), [9, 2, 2], [1, 2, 2], 2)
