"""Connection pruning (Han 2015): thresholds, masks, parametrizations, optimizers, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError, load_checkpoint, save_checkpoint
from nncompress.prune import (
    MagnitudeConfig,
    PruningMask,
    folded_copy,
    global_masks,
    magnitude_mask,
    magnitude_threshold,
    masks_from_zeros_,
    prune_,
    pruning_masks,
    remove_pruning_,
    threshold_mask,
)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def test_threshold_is_q_times_std_exactly():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.5, 1.0, 2.3):
        assert magnitude_threshold(w, q) == pytest.approx(
            q * np.std(w.numpy().astype(np.float64)), rel=1e-12, abs=0
        )
    mask = w.abs() > 0.5
    sub = w.numpy()[mask.numpy()].astype(np.float64)
    assert magnitude_threshold(w, 1.5, mask) == pytest.approx(1.5 * np.std(sub), rel=1e-12)
    with pytest.raises(ValueError, match="q=-1"):
        magnitude_threshold(w, -1)


def test_threshold_mask_keeps_strictly_greater():
    w = torch.tensor([-3.0, -1.0, 0.0, 1.0, 0.5, 2.0])
    assert threshold_mask(w, 1.0).tolist() == [True, False, False, False, False, True]
    assert threshold_mask(w, 0.0).tolist() == [True, True, False, True, True, True]


def test_magnitude_mask_count_and_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 40, generator=g)
    for s in (0.0, 0.1, 0.5, 0.93):
        m = magnitude_mask(w, s)
        n_keep = w.numel() - round(s * w.numel())
        assert int(m.sum()) == n_keep
        # reference: numpy argsort of |w| keeps the n_keep largest
        a = np.abs(w.numpy()).ravel()
        ref = np.zeros(a.size, bool)
        if n_keep:
            ref[np.argsort(-a, kind="stable")[:n_keep]] = True
        assert np.array_equal(m.numpy().ravel(), ref)
    with pytest.raises(ConfigError, match=r"sparsity=1.2.*\[0, 1\)"):
        magnitude_mask(w, 1.2)


def test_magnitude_mask_only_grows_existing_mask():
    w = torch.randn(200, generator=torch.Generator().manual_seed(3))
    old = torch.rand(200, generator=torch.Generator().manual_seed(4)) > 0.3
    m = magnitude_mask(w, 0.5, old)
    assert not bool((m & ~old).any())  # subset of the old mask
    assert int(m.sum()) == 100
    # asking for less sparsity than already present leaves the old mask
    assert torch.equal(magnitude_mask(w, 0.1, old), old)


def test_global_masks_rank_all_layers_together():
    g = torch.Generator().manual_seed(5)
    ws = {"a": torch.randn(10, 10, generator=g) * 0.1, "b": torch.randn(30, 5, generator=g)}
    masks = global_masks(ws, 0.6)
    total = sum(w.numel() for w in ws.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == total - round(0.6 * total)
    allw = torch.cat([w.abs().flatten() for w in ws.values()])
    cut = torch.sort(allw, descending=True).values[kept - 1]
    for n, w in ws.items():
        assert torch.equal(masks[n], w.abs() >= cut)
    # the small-magnitude layer loses more than the other
    assert masks["a"].float().mean() < masks["b"].float().mean()


def test_prune_layer_q_mode_and_report():
    model = _mlp()
    w0 = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    rep = prune_(model, MagnitudeConfig(q=0.8))
    assert set(rep) == {"0", "2", "4"}
    for n, r in rep.items():
        t = 0.8 * np.std(w0[n].numpy().astype(np.float64))
        assert r.threshold == pytest.approx(t, rel=1e-12)
        expect = w0[n].abs() > t
        eff = model.get_submodule(n).weight
        assert torch.equal(eff != 0, expect)
        assert r.kept == int(expect.sum())
        assert r.kept_fraction == pytest.approx(expect.float().mean().item())


def test_prune_sparsity_per_layer_override_exclude_and_errors():
    model = _mlp()
    cfg = MagnitudeConfig(sparsity=0.5, per_layer={"2": 0.75, "0": {"q": 0.0}}, exclude=("4",))
    rep = prune_(model, cfg)
    assert set(rep) == {"0", "2"}
    assert rep["2"].kept == 96 - 72
    assert rep["0"].kept == 16 * 12  # q=0 prunes nothing (no weight is exactly zero)
    assert not parametrize_on(model[4])
    with pytest.raises(ConfigError, match=r"sparsity=1.5 for layer 'fc'"):
        MagnitudeConfig(sparsity=0.5, per_layer={"fc": 1.5})
    with pytest.raises(ConfigError, match="exactly one of q or sparsity"):
        MagnitudeConfig(q=1.0, sparsity=0.5)
    with pytest.raises(ConfigError, match="scope='nope'"):
        MagnitudeConfig(sparsity=0.5, scope="nope")
    with pytest.raises(ConfigError, match="not prunable layers"):
        prune_(_mlp(), MagnitudeConfig(sparsity=0.5, per_layer={"fc9": 0.5}))


def parametrize_on(m: nn.Module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(m)


def test_prune_global_scope():
    model = _mlp()
    rep = prune_(model, MagnitudeConfig(sparsity=0.7, scope="global"))
    total = sum(r.params for r in rep.values())
    assert sum(r.kept for r in rep.values()) == total - round(0.7 * total)


def test_repruning_only_grows_mask():
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.5))
    before = {n: m.clone() for n, m in pruning_masks(model).items()}
    # perturb weights so that a different ranking would revive pruned ones
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.parametrizations.weight.original.add_(torch.randn_like(m.weight))
    prune_(model, MagnitudeConfig(sparsity=0.7))
    after = pruning_masks(model)
    for n in before:
        assert not bool((after[n] & ~before[n]).any())
        assert int(after[n].sum()) == after[n].numel() - round(0.7 * after[n].numel())
    assert sum(isinstance(p, PruningMask) for p in model[0].parametrizations.weight) == 1


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=1e-1),
    ],
)
def test_masks_survive_optimizer_steps(make_opt):
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.8))
    masks = {n: m.clone() for n, m in pruning_masks(model).items()}
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(32, 16, generator=g)
        loss = model(x).square().mean() + 1e-3 * sum(p.abs().sum() for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        for n, m in masks.items():
            grad = model.get_submodule(n).parametrizations.weight.original.grad
            assert torch.all(grad[~m] == 0)
        opt.step()
        for n, m in masks.items():
            mod = model.get_submodule(n)
            assert torch.all(mod.weight[~m] == 0)
            assert torch.all(mod.parametrizations.weight.original[~m] == 0)
    # survivors did train
    assert any(bool((model.get_submodule(n).weight[m] != 0).all()) for n, m in masks.items())


def test_checkpoint_folds_masks_and_masks_from_zeros(tmp_path):
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.6))
    masks = {n: m.clone() for n, m in pruning_masks(model).items()}
    x = torch.randn(4, 16)
    y = model(x)
    # folded_copy leaves the pruned model usable (torch's shared Parametrized class)
    plain = folded_copy(model)
    assert not any(parametrize_on(m) for m in plain.modules())
    assert torch.equal(plain(x), y) and torch.equal(model(x), y)
    path = save_checkpoint(plain, tmp_path / "p.safetensors")
    path2 = save_checkpoint(model, tmp_path / "q.safetensors")  # folds on its own as well
    from safetensors.torch import load_file

    assert load_file(str(path)).keys() == load_file(str(path2)).keys()
    for k, v in load_file(str(path)).items():
        assert torch.equal(v, load_file(str(path2))[k])
    from safetensors.torch import load_file

    raw = load_file(str(path))
    assert not any("parametrizations" in k for k in raw)
    for n, m in masks.items():
        assert torch.equal(raw[f"{n}.weight"] != 0, m)
    loaded, _ = load_checkpoint(path)
    got = masks_from_zeros_(loaded)
    assert set(got) == set(masks)
    assert torch.equal(loaded(x), y)
    for n, m in pruning_masks(loaded).items():
        assert torch.equal(m, masks[n])


def test_remove_pruning_keeps_zeros_and_values():
    model = _mlp()
    prune_(model, MagnitudeConfig(q=1.0))
    x = torch.randn(5, 16)
    y = model(x)
    eff = {n: model.get_submodule(n).weight.detach().clone() for n in pruning_masks(model)}
    assert remove_pruning_(model) == 3
    assert pruning_masks(model) == {}
    assert not any(parametrize_on(m) for m in model.modules())
    for n, w in eff.items():
        assert torch.equal(model.get_submodule(n).weight, w)
    assert torch.equal(model(x), y)


def test_conv_layers_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    rep = prune_(model, MagnitudeConfig(sparsity=0.5, include=("Conv2d",)))
    assert list(rep) == ["0"]
    assert rep["0"].kept == 18
    with pytest.raises(ConfigError, match="unknown types"):
        MagnitudeConfig(sparsity=0.5, include=("LSTM",))
