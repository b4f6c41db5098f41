"""Product quantization (Stock et al. 2020): EM against references, estimator, transform."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from nncompress.core import folded_copy
from nncompress.engine import ConfigError
from nncompress.quant import (
    PQConfig,
    PQWeight,
    ProductQuantizer,
    block_grams,
    k_for_budget,
    layer_rows,
    output_error,
    pq_bits,
    pq_em,
    pq_from_values_,
    pq_layers,
    pq_plan,
    pq_quantize_,
    reconstruct,
    refresh_batchnorm_,
    subvectors,
)


def _correlated_x(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -2, dim, dtype=torch.float64)  # strongly anisotropic inputs
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ (mix * scale)


def _non_increasing(obj: list[float]) -> bool:
    return all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(obj, obj[1:], strict=False))


# ------------------------------------------------------------------------------ tensor layer


def test_subvectors_are_kernels_in_unfold_order() -> None:
    w = torch.randn(5, 3, 3, 3)
    v = subvectors(w, 9)
    assert v.shape == (15, 9)
    for o in range(5):
        for c in range(3):
            assert torch.equal(v[o * 3 + c], w[o, c].flatten())
    with pytest.raises(ValueError, match="d=4"):
        subvectors(w, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2, groups=2),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", groups=4),
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding=1, padding_mode="reflect"),
        dict(in_channels=4, out_channels=8, kernel_size=1),
    ],
)
def test_layer_rows_reproduce_the_conv(kwargs) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(bias=False, **kwargs).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    rows = layer_rows(conv, x)  # (B*P, C_in*kh*kw)
    g = conv.groups
    w = conv.weight.reshape(conv.out_channels, -1)  # (C_out, L)
    L = w.shape[1]
    per = conv.out_channels // g
    y = torch.cat(
        [rows[:, i * L : (i + 1) * L] @ w[i * per : (i + 1) * per].T for i in range(g)], dim=1
    )  # (B*P, C_out)
    ref = conv(x).movedim(1, -1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(y, ref)


def test_block_grams_and_output_error() -> None:
    x = _correlated_x(50, 12)
    h = block_grams(x, 3, groups=2)
    assert h.shape == (2, 2, 3, 3)
    xs = x[:, 6 + 3 : 6 + 6]  # group 1, block 1
    torch.testing.assert_close(h[1, 1], xs.T @ xs)
    w = torch.randn(4, 6, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(4, 6, dtype=torch.float64)
    ref = torch.cat([x[:, :6] @ (w - w_hat)[:2].T, x[:, 6:] @ (w - w_hat)[2:].T], 1)
    assert output_error(w, w_hat, x, groups=2) == pytest.approx(float(ref.pow(2).sum()))


# ------------------------------------------------------------------------------ EM


@pytest.mark.parametrize("metric", ["block", "shared"])
@pytest.mark.parametrize("use_x", [True, False])
def test_em_objective_never_increases(metric: str, use_x: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(24, 8, 3, 3, dtype=torch.float64)
    w[:3, :2] = 0  # a few all-zero blocks, left out with zero_blocks
    x = _correlated_x(300, 72) if use_x else None
    for init in ("kmeans++", "random"):
        res = pq_em(w, x, 32, 9, 40, metric=metric, init=init, zero_blocks=True)
        assert len(res.objective) >= 2
        assert _non_increasing(res.objective), res.objective
        assert (res.assignments.reshape(24, 8)[:3, :2] == -1).all()
        assert (res.assignments >= 0).sum() == 24 * 8 - 6
        # the reported objective is J of the returned codebook and assignments
        w_hat = reconstruct(res.codebook, res.assignments, w.shape)
        if x is None:
            assert res.objective[-1] == pytest.approx(float((w - w_hat).pow(2).sum()))


def test_m_step_equals_lstsq_of_the_stacked_system() -> None:
    torch.manual_seed(2)
    w = torch.randn(16, 12, dtype=torch.float64)  # Linear: 16 rows of 12 = 3 blocks of 4
    x = _correlated_x(40, 12, seed=3)
    res = pq_em(w, x, 6, 4, 25)
    v = subvectors(w, 4)  # (48, 4)
    for c in range(6):
        members = torch.nonzero(res.assignments == c).flatten().tolist()
        a = torch.cat([x[:, (j % 3) * 4 : (j % 3) * 4 + 4] for j in members])  # stacked X_s(j)
        b = torch.cat([x[:, (j % 3) * 4 : (j % 3) * 4 + 4] @ v[j] for j in members])
        ref = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(res.codebook[c], ref, rtol=1e-7, atol=1e-9)


def test_identity_inputs_reduce_to_kmeans_like_sklearn() -> None:
    from sklearn.cluster import KMeans

    torch.manual_seed(4)
    w = torch.randn(64, 32, dtype=torch.float64)  # 512 subvectors of d=4
    eye = torch.eye(32, dtype=torch.float64)  # X = I: H_s = I for every block
    k, d = 16, 4
    v = subvectors(w, d).numpy()
    init = subvectors(w, d)[torch.randperm(512, generator=torch.Generator().manual_seed(0))[:k]]
    ours = pq_em(w, eye, k, d, 300, init=init.clone())
    weight_space = pq_em(w, None, k, d, 300, init=init.clone())
    assert torch.equal(ours.assignments, weight_space.assignments)
    sk = KMeans(k, init=init.numpy(), n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(v)
    assert ours.objective[-1] == pytest.approx(sk.inertia_, rel=0.01)
    # each side's own default initialisation (greedy k-means++), best of 10, on clustered data
    g = torch.Generator().manual_seed(5)
    centers = 2 * torch.randn(k, d, generator=g, dtype=torch.float64)
    pts = centers[torch.randint(k, (512,), generator=g)]
    pts = pts + 0.3 * torch.randn(512, d, generator=g, dtype=torch.float64)  # (512, d)
    sk2 = KMeans(k, n_init=10, random_state=0).fit(pts.numpy())
    best = min(pq_em(pts.reshape(64, 32), eye, k, d, 300, seed=s).objective[-1] for s in range(10))
    assert best == pytest.approx(sk2.inertia_, rel=0.01)


def test_reseeding_keeps_every_codeword_in_use() -> None:
    g = torch.Generator().manual_seed(5)
    points = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = points[torch.randint(5, (40, 3), generator=g)].reshape(40, 12)  # 5 distinct subvectors
    res = pq_em(w, None, 20, 4, 10, init="random")
    counts = torch.bincount(res.assignments, minlength=20)
    assert (counts > 0).all()
    assert res.reseeded > 0
    assert res.objective[-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="k=121"):
        pq_em(w, None, 121, 4, 3)


def test_activation_objective_beats_weight_objective_on_outputs() -> None:
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    m4 = q @ torch.diag(torch.tensor([3.0, 1.0, 0.1, 0.03], dtype=torch.float64)) @ q.T
    x = torch.randn(500, 64, generator=g, dtype=torch.float64) @ torch.block_diag(*[m4] * 16)
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    wt = pq_em(w, None, 16, 4, 30)
    err_wt = output_error(w, reconstruct(wt.codebook, wt.assignments, w.shape), x)
    for metric in ("block", "shared"):
        act = pq_em(w, x, 16, 4, 30, metric=metric)
        err_act = output_error(w, reconstruct(act.codebook, act.assignments, w.shape), x)
        assert err_act < 0.5 * err_wt


def test_estimator() -> None:
    torch.manual_seed(8)
    w = torch.randn(8, 4, 3, 3)
    x = torch.randn(100, 36)
    q = ProductQuantizer(k=8, block_size=9).fit(w, x)
    assert q.codebook_.shape == (8, 9) and q.codebook_.dtype == torch.float32
    assert q.assignments_.shape == (32,)
    assert _non_increasing(q.objective_) and q.n_iter_ >= 1
    assert q.reconstruct().shape == w.shape
    assert q.bits() == 32 * 3 + 8 * 9 * 16
    with pytest.raises(ValueError, match="needs the input rows"):
        ProductQuantizer(k=8, block_size=9).fit(w)
    qw = ProductQuantizer(k=8, block_size=9, objective="weight").fit(w)
    assert len(qw.objective_) >= 1


def test_bits_and_budget() -> None:
    assert pq_bits(100, 16, 9) == 100 * 4 + 16 * 9 * 16
    assert pq_bits(100, 16, 9, zero_code=True) == 100 * 5 + 16 * 9 * 16
    for n, d, bpw in [(4096, 9, 1.0), (256, 9, 2.0), (58800, 4, 1.5), (16, 9, 0.5)]:
        k = k_for_budget(n, d, bpw, max_k=1024)
        fits = [2**b for b in range(1, 11) if pq_bits(n, 2**b, d) <= bpw * n * d and 2**b <= n // 4]
        assert k == (max(fits) if fits else 0)


def test_centroid_gradient_is_the_mean_of_its_subvectors() -> None:
    torch.manual_seed(9)
    cb = torch.randn(3, 2)
    a = torch.tensor([0, 0, 1, -1, 2, 0])
    p = PQWeight(cb, a, (3, 4))
    target = torch.randn(3, 4)
    w = p(torch.empty(0))
    assert torch.equal(w.reshape(6, 2)[3], torch.zeros(2))
    (w * target).sum().backward()
    g = target.reshape(6, 2)
    torch.testing.assert_close(p.codebook.grad[0], g[[0, 1, 5]].mean(0))
    torch.testing.assert_close(p.codebook.grad[1], g[2])
    s = PQWeight(cb, a, (3, 4), centroid_grad="sum")
    (s(torch.empty(0)) * target).sum().backward()
    torch.testing.assert_close(s.codebook.grad[0], g[[0, 1, 5]].sum(0))


# ------------------------------------------------------------------------------ transform


class _Batches:
    """A re-iterable list of (inputs, labels) batches."""

    def __init__(self, shape: tuple[int, ...], n: int = 4, batch: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = [
            (torch.randn(batch, *shape, generator=g), torch.zeros(batch, dtype=torch.long))
            for _ in range(n)
        ]

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def _convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.Conv2d(8, 16, 1),  # 1x1
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


FAST = dict(k=16, em_iters=5, calibration_batches=2, max_rows=256, layer_steps=2, global_steps=2)


def test_transform_on_grouped_depthwise_and_pointwise_convs() -> None:
    torch.manual_seed(10)
    model = _convnet()
    data = _Batches((4, 6, 6))
    report = pq_quantize_(model, PQConfig(**FAST, bn_batches=2), data)
    names = [r.name for r in report.layers]
    assert names == ["0", "3", "5", "6", "10"]  # forward order, every conv kind
    layers = pq_layers(model)
    assert set(layers) == set(names)
    for r in report.layers:
        p = layers[r.name]
        w = dict(model.named_modules())[r.name].weight
        assert w.shape == r.shape
        d = r.block_size
        distinct = torch.unique(w.detach().reshape(-1, d), dim=0)
        assert distinct.shape[0] <= r.k
        # codebooks are fp16 values (what the file stores)
        assert torch.equal(p.codebook, p.codebook.half().float())
        assert r.bits_per_weight == pytest.approx(
            (r.index_bits + r.codebook_bits) / math.prod(r.shape)
        )
        assert _non_increasing(r.objective)
    # 1x1 conv and Linear got d=4, 3x3 convs d=9; depthwise 3x3 has one block per channel
    assert [r.block_size for r in report.layers] == [9, 9, 9, 4, 4]
    assert report.layers[2].k <= 2  # 8 subvectors / 4 per codeword
    out = model(data.data[0][0])
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert set(report.timings) >= {"em_s", "layer_finetune_s", "global_finetune_s"}


def test_transform_on_linear_only_mlp_with_weight_objective_and_pruned_blocks() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        model[0].weight[:, :8] = 0  # pruned: two all-zero blocks of 4 in every row
    data = _Batches((20,))
    for objective in ("activation", "weight"):
        m = copy.deepcopy(model)
        report = pq_quantize_(m, PQConfig(**FAST, objective=objective), data)
        w0 = m[0].weight.detach()
        assert torch.equal(w0[:, :8], torch.zeros(32, 8))  # pruned blocks stay zero
        assert report.layers[0].zero_blocks == 64
        assert report.layers[0].index_bits == 160 * 5  # 16 codes + the reserved one: 5 bits


def test_transform_budget_gives_small_layers_small_k() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    report = pq_quantize_(
        model, PQConfig(**{**FAST, "k": 256}, bits_per_weight=1.5), _Batches((64,))
    )
    ks = [r.k for r in report.layers]
    assert ks[0] > ks[1]
    for r in report.layers:
        assert r.bits_per_weight <= 1.5


def test_bias_correction_restores_the_mean_output() -> None:
    torch.manual_seed(14)
    layer = nn.Linear(12, 6)
    model = nn.Sequential(layer)
    twin = copy.deepcopy(model)
    data = _Batches((12,), n=2, batch=32)
    x = torch.cat([b[0] for b in data.data])  # (64, 12): every row is sampled
    with torch.no_grad():
        before = layer(x).mean(0)
    cfg = PQConfig(k=4, em_iters=5, layer_steps=0, bn_batches=0, calibration_batches=2)
    pq_quantize_(model, cfg, data)
    pq_quantize_(twin, PQConfig(**{**vars(cfg), "bias_correction": False}), data)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).mean(0), before, rtol=1e-5, atol=1e-5)
        assert (twin[0](x).mean(0) - before).abs().max() > 1e-3  # uncorrected: it moved


def test_plan_matches_the_transform() -> None:
    cfg = PQConfig(**{**FAST, "k": 256}, bits_per_weight=1.5)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    plan = pq_plan(model, cfg)
    report = pq_quantize_(model, cfg, _Batches((64,)))
    for r in report.layers:
        assert plan[r.name]["k"] == r.k and plan[r.name]["block_size"] == r.block_size
        assert plan[r.name]["bits"] == r.index_bits + r.codebook_bits


def test_pq_from_values_rebuilds_the_parametrization() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    pq_quantize_(model, PQConfig(**FAST), _Batches((20,)))
    plain = folded_copy(model)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    assert pq_from_values_(plain, {"0": 4, "2": 4}) == ["0", "2"]
    assert set(pq_layers(plain)) == {"0", "2"}
    for name, p in pq_layers(plain).items():
        assert torch.equal(dict(plain.named_modules())[name].weight, before[f"{name}.weight"])
        assert p.k <= 16
    assert (pq_layers(plain)["0"].assignments.reshape(32, 5)[:, 0] == -1).all()
    dense = nn.Sequential(nn.Linear(20, 32))
    assert pq_from_values_(dense, {"0": 4}) == []  # random weights: all distinct
    with pytest.raises(ConfigError, match="nope"):
        pq_from_values_(dense, {"nope": 4})


def test_refresh_batchnorm_is_the_cumulative_average() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    data = _Batches((2, 4, 4), n=3)
    refresh_batchnorm_(model, data, 3)
    with torch.no_grad():
        ys = torch.cat([model[0](x) for x, _ in data.data])  # (48, 3, 4, 4)
    torch.testing.assert_close(model[1].running_mean, ys.mean((0, 2, 3)))
    assert model[1].momentum == 0.1


@pytest.mark.parametrize(
    "config, loader, teacher, match",
    [
        (dict(block_size_conv=4), None, None, "layer '5': block_size=4 does not divide its row"),
        (dict(per_layer_k={"3": 999}), None, None, r"per_layer_k\['3'\]=999"),
        (dict(k=16, min_per_codeword=0), None, None, "k=16: above layer '5'"),
        (dict(bits_per_weight=0.1), None, None, "bits_per_weight=0.1 cannot be met"),
        (dict(), _Batches((3, 6, 6)), None, "calibration_loader: a batch of shape"),
        (dict(), None, nn.Sequential(nn.Flatten(), nn.Linear(144, 7)), "teacher: outputs"),
        (dict(per_layer_k={"nope": 2}), None, None, "per_layer_k"),
    ],
)
def test_bad_input_is_refused_before_any_em(config, loader, teacher, match) -> None:
    model = _convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        pq_quantize_(model, PQConfig(**config), loader or _Batches((4, 6, 6)), teacher=teacher)
    assert not pq_layers(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="k=70000"):
        PQConfig(k=70000)
    with pytest.raises(ConfigError, match="objective"):
        PQConfig(objective="output")
    with pytest.raises(ConfigError, match="block_size_fc"):
        PQConfig(block_size_fc=0)
    with pytest.raises(ConfigError, match="calibration_loader=None"):
        pq_quantize_(_convnet(), PQConfig())


def test_kd_fine_tuning_lowers_the_distillation_loss() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    data = _Batches((16,), n=2, batch=64)
    cfg = PQConfig(k=4, em_iters=10, layer_steps=60, layer_lr=0.5, momentum=0.9, bn_batches=0)
    report = pq_quantize_(model, cfg, data, filter="0")
    r = report.layers[0]
    assert r.kd_loss_after < r.kd_loss_before


def test_diverging_layer_fine_tuning_is_reverted() -> None:
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    data = _Batches((16,), n=2, batch=64)
    cfg = PQConfig(k=4, em_iters=10, layer_steps=5, layer_lr=1e4, bn_batches=0)
    r = pq_quantize_(model, cfg, data, filter="0").layers[0]
    assert r.finetune_reverted and r.kd_loss_after > r.kd_loss_before
    torch.manual_seed(16)
    twin = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    pq_quantize_(twin, PQConfig(**{**vars(cfg), "layer_steps": 0}), data, filter="0")
    assert torch.equal(model[0].weight, twin[0].weight)  # EM's codebook, as without tuning
