"""refit_: least-squares refit of decomposed blocks to the original layers' responses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nncompress.lowrank import DecomposeConfig, decompose_, refit_


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, *shape, generator=g), None) for _ in range(n)]


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _ConvNet().eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_refit_lowers_response_and_output_error(method):
    net = _net()
    ref = copy.deepcopy(net)
    rank = 3 if method == "tucker2" else 4
    report = decompose_(net, DecomposeConfig(method=method, rank=rank), filter=["conv1", "conv2"])
    assert report.decomposed == ["conv1", "conv2"]
    calib, held = _batches(6, (3, 8, 8)), _batches(2, (3, 8, 8), seed=1)
    frozen = {n: p.clone() for n, p in net.named_parameters()}

    def out_err() -> float:
        with torch.no_grad():
            return sum(float((net(x) - ref(x)).norm() / ref(x).norm()) for x, _ in held)

    before = out_err()
    res = refit_(net, ref, calib, report.decomposed, batches=6)
    assert [r.name for r in res] == ["conv1", "conv2"]
    assert all(r.applied and r.error_after < r.error_before for r in res)
    assert res[0].samples == 6 * 32 * 8 * 8
    # the whole network moved closer to the original on images the refit did not see
    assert out_err() < before
    # only the last factor of each block changed (Tucker-2: and the core before it)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, frozen[n])}
    allowed = {
        f"{b}.{i}.{k}" for b in ("conv1", "conv2") for i in (1, 2, 3) for k in ("weight", "bias")
    }
    if method == "cp":  # the factor before the last is depthwise: not refitted
        allowed = {n for n in allowed if n.split(".")[1] == "3"}
    else:
        allowed = {n for n in allowed if n.split(".")[1] in ("1", "2")}
    assert changed and changed <= allowed, changed


def test_refit_last_factor_is_the_least_squares_fit():
    """Separable pair: the refitted 1 x k factor equals an independent least-squares fit."""
    import torch.nn.functional as F

    from nncompress.lowrank import separable_conv

    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    model, ref = nn.Sequential(separable_conv(conv, 2)), nn.Sequential(conv)
    calib = _batches(3, (3, 6, 6))
    (res,) = refit_(model, ref, calib, ["0"], batches=3, ridge=0.0)
    assert res.applied
    first, second = model[0][0], model[0][1]
    x = torch.cat([b for b, _ in calib])  # (96, 3, 6, 6)
    with torch.no_grad():
        z = first(x)  # (96, 2, 6, 6)
        cols = F.unfold(z, second.kernel_size, second.dilation, second.padding, second.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (96*36, 2*1*3)
        rows = torch.cat([rows, torch.ones(len(rows), 1)], dim=1)
        y = conv(x).movedim(1, -1).reshape(-1, 5)  # (96*36, 5)
        want = torch.linalg.lstsq(rows.double(), y.double()).solution  # (7, 5)
    got = torch.cat([second.weight.reshape(5, -1).T, second.bias[None]], dim=0).double()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_svd_refit_uses_the_input_distribution():
    """Inputs on a 4-dimensional subspace: a rank-4 SVD block refitted on them is exact there,
    which the weight-space truncation (rank 4 of a full-rank matrix) is not."""
    torch.manual_seed(6)
    lin = nn.Sequential(nn.Linear(20, 15))
    ref = copy.deepcopy(lin)
    decompose_(lin, DecomposeConfig(method="svd", rank=4))
    basis = torch.randn(4, 20)

    def batches(seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(64, 4, generator=g) @ basis, None) for _ in range(3)]

    (res,) = refit_(lin, ref, batches(0), ["0"], batches=3, ridge=0.0)
    assert res.error_before > 0.1 and res.error_after < 1e-4
    x = batches(1)[0][0]
    torch.testing.assert_close(lin(x), ref(x), atol=1e-3, rtol=1e-3)


def test_refit_at_full_rank_keeps_the_exact_factors():
    torch.manual_seed(4)
    from nncompress.lowrank import tucker2_conv

    conv = nn.Conv2d(4, 6, 3, padding=1)
    model, ref = nn.Sequential(tucker2_conv(conv, (6, 4))), nn.Sequential(conv)
    x = torch.randn(2, 4, 7, 7)
    res = refit_(model, ref, _batches(2, (4, 7, 7)), ["0"], batches=2)
    assert res[0].error_after <= res[0].error_before < 1e-5
    torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_refit_skips_blocks_without_a_linear_last_factor():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 32))
    ref = copy.deepcopy(model)
    rep = decompose_(model, DecomposeConfig(method="tt", rank=2, require_fewer_macs=False))
    assert rep.decomposed == ["0"]
    assert refit_(model, ref, _batches(1, (64,)), rep.decomposed) == []


def test_refit_errors():
    net = _net()
    ref = copy.deepcopy(net)
    decompose_(net, DecomposeConfig(method="tucker2", rank=3), filter=["conv2"])
    calib = _batches(1, (3, 8, 8))
    with pytest.raises(ValueError, match="batches=0"):
        refit_(net, ref, calib, ["conv2"], batches=0)
    with pytest.raises(ValueError, match="ridge=-1"):
        refit_(net, ref, calib, ["conv2"], ridge=-1.0)
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        refit_(net, ref, calib, ["nope"])
    with pytest.raises(ValueError, match="no calibration batches"):
        refit_(net, ref, [], ["conv2"])


def test_stage_refit_field(digits_data, tmp_path):
    from nncompress.engine import ConfigError, TrainConfig, fit
    from nncompress.models import create
    from nncompress.stages.decompose import DecomposeStageConfig, decompose_and_finetune

    with pytest.raises(ConfigError, match="refit_batches=-1"):
        DecomposeStageConfig.from_dict({"method": "svd", "rank": 2, "refit_batches": -1})
    torch.manual_seed(8)
    model = create("lenet-300-100", in_features=64)
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=64)
    fit(model, digits_data.loader("train", 64), cfg)
    stage = DecomposeStageConfig.from_dict(
        {"method": "svd", "rank": 3, "layers": ["fc1"], "refit_batches": 4}
    )
    _, info = decompose_and_finetune(model, digits_data, stage, cfg)
    (r,) = info["refit"]
    assert r["name"] == "fc1" and r["applied"] and r["error_after"] < r["error_before"]
    assert r["samples"] == 4 * 64
