"""Weight sharing: 1-D k-means against scikit-learn, the codebook parametrization's gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

from nncompress.engine import ConfigError, TrainConfig, fit, load_checkpoint, save_checkpoint
from nncompress.models import create
from nncompress.prune.magnitude import PruningMask, apply_mask_
from nncompress.quant import (
    KMeansConfig,
    KMeansQuantizer,
    kmeans_1d,
    share_from_values_,
    share_weights_,
    shared_layers,
    sharing_compression_rate,
)


@pytest.fixture(scope="module")
def trained_weights(digits_data):
    """Real layer weights: LeNet-300-100 (64 inputs) trained 3 epochs on 8x8 digits."""
    torch.manual_seed(0)
    model = create("lenet-300-100", in_features=64, num_classes=10)
    fit(model, digits_data.loader("train", 64), TrainConfig(epochs=3, lr=0.05))
    return model


def _sk_inertia(x: np.ndarray, k: int, **kw) -> float:
    return float(KMeans(k, **kw).fit(x[:, None]).inertia_)


def _sk_centroids(x: np.ndarray, k: int, **kw) -> np.ndarray:
    return np.sort(KMeans(k, **kw).fit(x[:, None]).cluster_centers_.ravel())


def _inertia(x: np.ndarray, codebook: torch.Tensor, labels: torch.Tensor) -> float:
    return float(np.sum((x - codebook.double().numpy()[labels.numpy()]) ** 2))


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
@pytest.mark.parametrize("init", ["linear", "density"])
def test_kmeans_matches_sklearn_same_init(trained_weights, layer, init):
    w = getattr(trained_weights, layer).weight.detach().flatten()
    x = w.double().numpy()
    k = 32
    cb, labels = kmeans_1d(w, k, init=init)
    ours = _inertia(x, cb, labels)
    if init == "linear":
        start = np.linspace(x.min(), x.max(), k)
    else:
        start = np.quantile(np.sort(x), (np.arange(k) + 0.5) / k)
    ref = _sk_inertia(x, k, init=start[:, None], n_init=1, max_iter=300, tol=0.0)
    assert ours <= 1.01 * ref, (ours, ref)
    # same data, same init, Lloyd to convergence: the same centroids as scikit-learn's
    sk = _sk_centroids(x, k, init=start[:, None], n_init=1, max_iter=300, tol=0.0)
    np.testing.assert_allclose(np.sort(cb.double().numpy()), sk, rtol=0, atol=1e-5 * np.ptp(x))


def test_kmeans_best_of_n_forgy_matches_sklearn_random(trained_weights):
    w = trained_weights.fc2.weight.detach().flatten()
    x = w.double().numpy()
    q = KMeansQuantizer(bits=4, init="forgy", n_init=10, random_state=0).fit(w)
    ref = _sk_inertia(x, 16, init="random", n_init=10, random_state=0)
    assert q.inertia_ <= 1.01 * ref, (q.inertia_, ref)
    # and against scikit-learn's own default (k-means++ best of 10) on the same data
    assert q.inertia_ <= 1.25 * _sk_inertia(x, 16, n_init=10, random_state=0)


def test_kmeans_labels_are_nearest_centroids_and_inertia_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, generator=g) * 0.1
    q = KMeansQuantizer(bits=3).fit(w)
    d = (w[:, None].double() - q.codebook_[None, :].double()).abs()  # (n, k)
    assert torch.equal(d.argmin(1), q.labels_) or torch.allclose(
        d.gather(1, q.labels_[:, None]).squeeze(1), d.min(1).values
    )
    assert q.inertia_ == pytest.approx(float(((w.double() - q.reconstruct().double()) ** 2).sum()))
    assert torch.all(q.codebook_[1:] >= q.codebook_[:-1])
    # a Lloyd fixed point: each centroid is the mean of its members
    for j in range(8):
        members = w[q.labels_ == j]
        if members.numel():
            assert float(q.codebook_[j]) == pytest.approx(float(members.double().mean()), abs=1e-6)


def test_kmeans_empty_clusters_and_few_values():
    # big gap between two groups: linear init leaves middle centroids empty at first
    w = torch.tensor([0.0, 0.01, 0.02, 10.0, 10.01, 10.02, 10.03])
    cb, labels = kmeans_1d(w, 4, init="linear")
    assert torch.isfinite(cb).all()
    assert len(torch.unique(labels)) == 4  # re-seeded clusters got members
    # fewer distinct values than clusters: exact reconstruction
    w = torch.tensor([1.0, 2.0, 2.0, 1.0, 3.0])
    cb, labels = kmeans_1d(w, 8)
    assert cb.shape == (8,)
    assert torch.equal(cb[labels], w)


def test_kmeans_bad_arguments():
    with pytest.raises(ValueError, match="k=0"):
        kmeans_1d(torch.ones(3), 0)
    with pytest.raises(ValueError, match="init='kmeans'"):
        kmeans_1d(torch.ones(3), 2, init="kmeans")
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(torch.ones(0), 2)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(torch.tensor([1.0, float("nan")]), 2)


def test_sharing_compression_rate_formula():
    # Deep Compression eq. 2 example: 16 weights, 4 clusters, 32-bit -> 16*32/(16*2+4*32) = 3.2
    assert sharing_compression_rate(16, 4) == pytest.approx(3.2)
    assert sharing_compression_rate(1000, 32, 32) == pytest.approx(32000 / (5000 + 1024))


def test_config_errors_name_fields():
    with pytest.raises(ConfigError, match="bits_fc=40: must be in \\[1, 16\\]"):
        KMeansConfig(bits_fc=40)
    with pytest.raises(ConfigError, match="per_layer\\['fc1'\\]=0"):
        KMeansConfig(per_layer={"fc1": 0})
    with pytest.raises(ConfigError, match="init='x'"):
        KMeansConfig(init="x")
    model = create("lenet-300-100", in_features=64)
    with pytest.raises(ConfigError, match="fc9"):
        share_weights_(model, KMeansConfig(per_layer={"fc9": 4}))


def _tiny_pruned_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with torch.no_grad():
        for m in (model[0], model[3]):
            m.weight[m.weight.abs() < m.weight.abs().median()] = 0.0
    return model


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_centroid_gradient_is_sum_or_mean_of_weight_gradients(mode):
    model = _tiny_pruned_model()
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 5, (8,))
    report = share_weights_(model, KMeansConfig(bits_conv=3, bits_fc=2, centroid_grad=mode))
    assert [r.name for r in report.layers] == ["0", "3"]
    assert [r.k for r in report.layers] == [8, 4]
    # reference: the same effective weights as plain leaf tensors
    ref = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with torch.no_grad():
        for i in (0, 3):
            ref[i].weight.copy_(model[i].weight)
            ref[i].bias.copy_(model[i].bias)
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(ref(x), y).backward()
    for i in (0, 3):
        p = shared_layers(model)[str(i)]
        g = ref[i].weight.grad  # (weight shape)
        expected = torch.zeros(p.k).index_add_(0, p.indices[p.mask], g[p.mask])  # (k,)
        if mode == "mean":
            expected = expected / torch.bincount(p.indices[p.mask], minlength=p.k).clamp(min=1)
        torch.testing.assert_close(p.codebook.grad, expected, rtol=1e-5, atol=1e-7)
        # the forward value is exactly the codebook gathered by index, in both modes
        assert torch.equal(model[i].weight[p.mask], p.codebook.detach()[p.indices[p.mask]])
        assert model[i].parametrizations.weight.original.grad is None


def test_zeros_stay_zero_and_indices_fixed_through_optimizer_steps():
    model = _tiny_pruned_model()
    # layer 3 also carries the pruning mask parametrization: sharing composes after it
    apply_mask_(model[3], model[3].weight != 0)
    assert isinstance(model[3].parametrizations.weight[0], PruningMask)
    zeros = {i: (model[i].weight == 0).clone() for i in (0, 3)}
    share_weights_(model, KMeansConfig(bits_conv=4, bits_fc=3))
    idx = {n: p.indices.clone() for n, p in shared_layers(model).items()}
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=0.1
    )
    for _ in range(5):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for i in (0, 3):
        w = model[i].weight
        assert torch.all(w[zeros[i]] == 0)
        assert not torch.signbit(w[zeros[i]]).any()  # +0.0, not -0.0
        assert torch.all(w[~zeros[i]] != 0)
        p = shared_layers(model)[str(i)]
        assert torch.equal(p.indices, idx[str(i)])
        assert set(torch.unique(w[~zeros[i]]).tolist()) <= set(p.codebook.detach().tolist())


def test_share_from_values_rebuilds_after_checkpoint(tmp_path, trained_weights):
    model = create("lenet-300-100", in_features=64, num_classes=10)
    model.load_state_dict(trained_weights.state_dict())
    with torch.no_grad():
        model.fc1.weight[model.fc1.weight.abs() < 0.05] = 0.0
    share_weights_(model, KMeansConfig(bits_fc=4, per_layer={"fc3": 6}))
    before = {n: m.weight.detach().clone() for n, m in model.named_children() if n[:2] == "fc"}
    path = save_checkpoint(
        model, tmp_path / "s.safetensors", model_name="lenet-300-100",
        model_kwargs={"in_features": 64, "num_classes": 10},
    )  # fmt: skip
    loaded, _ = load_checkpoint(path)
    assert not shared_layers(loaded)
    rebuilt = share_from_values_(loaded)
    assert rebuilt == ["fc1", "fc2", "fc3"]
    for n, w in before.items():
        assert torch.equal(getattr(loaded, n).weight, w)
    layers = shared_layers(loaded)
    assert layers["fc1"].k <= 16 and layers["fc3"].k <= 64
    assert torch.equal(layers["fc1"].mask, before["fc1"] != 0)
