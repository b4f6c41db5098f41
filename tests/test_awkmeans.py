import copy

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

from nncompress.engine import ConfigError
from nncompress.engine.batches import main_output, run_model
from nncompress.io import decode_bytes, encode_state_dict
from nncompress.quant import KMeansConfig, share_weights_, shared_layers
from nncompress.quant.awkmeans import AwareKMeansConfig, share_weights_aware_, weighted_kmeans_1d


@pytest.mark.parametrize("init", ["linear", "density"])
def test_weighted_kmeans_matches_sklearn_same_init(init):
    rng = np.random.default_rng(0)
    x = rng.standard_t(4, 3000)
    a = rng.gamma(0.5, size=3000)
    k = 8
    cb, labels, inertia = weighted_kmeans_1d(x, a, k, init=init, max_iter=300)
    if init == "linear":
        start = np.linspace(x.min(), x.max(), k)
    else:
        from nncompress.quant.awkmeans import _weighted_init

        o = np.argsort(x)
        start = np.sort(_weighted_init(x[o], a[o], np.cumsum(a[o]), k, "density"))
    ref = KMeans(k, init=start[:, None], n_init=1, max_iter=300, tol=0.0).fit(
        x[:, None], sample_weight=a
    )
    ref_inertia = float(np.sum(a * (x - ref.cluster_centers_[ref.labels_, 0]) ** 2))
    assert inertia <= ref_inertia * 1.001
    ours = float(np.sum(a * (x - cb.double().numpy()[labels.numpy()]) ** 2))
    assert ours == pytest.approx(inertia, rel=1e-9)
    # uniform weights: the plain k-means objective
    cb1, lab1, in1 = weighted_kmeans_1d(x, np.ones_like(x), k, init="linear", max_iter=300)
    ref1 = KMeans(k, init=np.linspace(x.min(), x.max(), k)[:, None], n_init=1, tol=0.0).fit(
        x[:, None]
    )
    assert in1 <= ref1.inertia_ * 1.001


def test_weighted_kmeans_rejects_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        weighted_kmeans_1d(np.ones(4), -np.ones(4), 2)
    with pytest.raises(ValueError, match="k="):
        weighted_kmeans_1d(np.ones(4), np.ones(4), 0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.fc = nn.Linear(32, 48)
        self.out = nn.Linear(48, 40, bias=False)
        self.head = nn.Linear(32, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids):
        h = self.emb(input_ids)
        scale = torch.linspace(0.05, 3.0, 32)  # uneven input energy: what the weighting uses
        return self.out(torch.relu(self.fc(h * scale))) + self.head(h)


def _batches(n=6):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 40, (8, 10), generator=g)} for _ in range(n)]


def _out(m, bs):
    with torch.no_grad():
        return torch.cat([main_output(run_model(m, b)) for b in bs])


def test_aware_kmeans_lowers_output_error_keeps_ties_and_stores_once():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():  # small weights on the high-energy inputs: plain k-means blurs them
        net.fc.weight /= torch.linspace(0.05, 3.0, 32)[None, :] * 4
    calib = _batches()

    def fc_out(m):  # the layer's response on the calibration inputs
        with torch.no_grad():
            return torch.cat(
                [m.fc(m.emb(b["input_ids"]) * torch.linspace(0.05, 3.0, 32)) for b in calib]
            )

    ref = fc_out(net)
    plain = copy.deepcopy(net)
    share_weights_(plain, KMeansConfig(bits_fc=3), filter=lambda n, m: n == "fc")
    aware = copy.deepcopy(net)
    rep = share_weights_aware_(aware, AwareKMeansConfig(bits=3, include=("fc",)), calib)
    assert [r.name for r in rep.layers] == ["fc"] and rep.layers[0].k == 8
    e_plain = float((fc_out(plain) - ref).norm())
    e_aware = float((fc_out(aware) - ref).norm())
    assert e_aware < 0.8 * e_plain
    # embeddings and the tied head: one parametrization, stored once
    full = copy.deepcopy(net)
    share_weights_aware_(full, AwareKMeansConfig(bits=4, embedding_bits=5), calib)
    layers = shared_layers(full)
    assert layers["emb"] is layers["head"] and layers["emb"].k == 32
    assert torch.equal(full.emb.weight, full.head.weight)
    data, report = encode_state_dict(full)
    assert report.tensor("head.weight").scheme == "alias"
    assert report.tensor("emb.weight").scheme == "codebook"
    state, _ = decode_bytes(data)
    assert torch.equal(state["emb.weight"], full.emb.weight.detach())
    assert torch.equal(state["head.weight"], full.emb.weight.detach())


def test_aware_kmeans_config_errors():
    with pytest.raises(ConfigError, match="bits=17"):
        AwareKMeansConfig(bits=17)
    with pytest.raises(ConfigError, match="calibration"):
        share_weights_aware_(_Net(), AwareKMeansConfig())
    with pytest.raises(ConfigError, match=r"per_layer\['x\*'\]"):
        share_weights_aware_(_Net(), AwareKMeansConfig(per_layer={"x*": 2}), _batches(1))
