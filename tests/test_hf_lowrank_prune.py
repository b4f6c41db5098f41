"""Whitened SVD and Wanda / 2:4 pruning, on toy layers and tiny Hugging Face models."""

import copy

import pytest
import torch
from torch import nn

from hf_tiny import bert, gpt2, image_batches, text_batches, vit
from nncompress.engine import ConfigError
from nncompress.engine.batches import main_output, run_model
from nncompress.lowrank.whiten import WhitenedSVDConfig, decompose_whitened_, whitened_svd
from nncompress.prune.wanda import WandaConfig, nm_mask, prune_wanda_, wanda_scores


def _x(n=2000, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)) * torch.logspace(
        -1, 1, d
    )


def test_whitened_svd_is_the_output_optimal_low_rank_map():
    x = _x()
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = x.double().T @ x.double()
    for r in (2, 6, 12):
        a, b, s = whitened_svd(w, gram, r, damp=1e-12)
        err = torch.linalg.norm(x.double() @ (w - b @ a).T) ** 2
        # Eckart-Young on the whitened matrix: the error is the tail of its spectrum
        assert float(err) == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-6)
        u, sv, vh = torch.linalg.svd(w)
        plain = (u[:, :r] * sv[:r]) @ vh[:r]
        assert float(err) <= float(torch.linalg.norm(x.double() @ (w - plain).T) ** 2)
    a, b, _ = whitened_svd(w, gram, 16, damp=1e-12)  # full rank reproduces the layer
    torch.testing.assert_close(b @ a, w, rtol=1e-7, atol=1e-7)


CASES = {"bert": (bert, text_batches), "gpt2": (gpt2, text_batches), "vit": (vit, image_batches)}


def _out(model, batches):
    with torch.no_grad():
        return torch.cat([main_output(run_model(model, b)).flatten(1) for b in batches])


@pytest.mark.parametrize("name", sorted(CASES))
def test_whitened_svd_on_hf_models_beats_plain_svd(name):
    make, batches = CASES[name]
    model = make()
    calib = batches(4)
    res = decompose_whitened_(model, WhitenedSVDConfig(rank_fraction=0.5), calib)
    assert res and all(r.params_after < r.params_before for r in res)
    assert all(r.output_error <= r.output_error_plain_svd + 1e-9 for r in res)
    ref = _out(make(), calib)
    got = _out(model, calib)
    assert got.shape == ref.shape  # the decomposed model still runs (Conv1D -> Linears)
    with pytest.raises(ConfigError, match="exactly one"):
        WhitenedSVDConfig()


def test_nm_mask_keeps_n_of_every_m():
    s = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    keep = nm_mask(s, 2, 4)
    assert torch.equal(keep.reshape(6, 4, 4).sum(2), torch.full((6, 4), 2))
    # the kept ones are the two largest of each group
    g = s.reshape(6, 4, 4)
    kept_min = torch.where(keep.reshape(6, 4, 4), g, torch.inf).amin(2)
    dropped_max = torch.where(keep.reshape(6, 4, 4), -torch.inf, g).amax(2)
    assert bool((kept_min >= dropped_max).all())
    with pytest.raises(ValueError, match="N:M"):
        nm_mask(s, 2, 5)


def test_wanda_scores_and_row_sparsity_beat_magnitude_on_output():
    torch.manual_seed(0)
    x = _x(3000, 32)
    lin = nn.Sequential(nn.Linear(32, 16))
    calib = [x[i : i + 500] for i in range(0, 3000, 500)]
    ref = lin(x).detach()
    errs = {}
    for aware in (False, True):
        m = copy.deepcopy(lin)
        rep = prune_wanda_(m, WandaConfig(sparsity=0.5, activation_aware=aware), calib)
        mask = m[0].parametrizations.weight[0].mask
        assert torch.equal(mask.sum(1), torch.full((16,), 16))  # per row
        assert rep[0].sparsity == pytest.approx(0.5)
        errs[aware] = float((m(x).detach() - ref).norm())
    assert errs[True] < errs[False]
    norms = x.pow(2).sum(0).sqrt()
    torch.testing.assert_close(wanda_scores(lin[0].weight, norms), lin[0].weight.abs() * norms)


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_four_on_hf_models(name):
    make, batches = CASES[name]
    model = make()
    rep = prune_wanda_(model, WandaConfig(nm=(2, 4), exclude=("lm_head",)), batches(2))
    assert rep and all(r.pattern == "2:4" and r.sparsity == pytest.approx(0.5) for r in rep)
    if name == "gpt2":  # Conv1D: weight (in, out), groups of 4 along the input
        w = model.transformer.h[0].mlp.c_fc.weight  # (64, 256)
        assert torch.equal((w.T.reshape(256, 16, 4) != 0).sum(2) <= 2, torch.ones(256, 16).bool())
    _out(model, batches(1))
