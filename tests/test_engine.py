"""Training engine: accuracy on digits, regularisers, clipping, early stopping, callbacks."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from nncompress.data import BatchLoader
from nncompress.engine import (
    Callback,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    evaluate,
    finetune,
    fit,
    model_device,
)
from nncompress.models import create


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _one_batch(n: int = 8, seed: int = 0) -> BatchLoader:
    g = torch.Generator().manual_seed(seed)
    return BatchLoader(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g), n)


def _zero_loss(out, y, x):
    """A loss with zero data gradient: only the regularisers move the weights."""
    return 0.0 * out.sum()


PLAIN = dict(optimizer="sgd", momentum=0.0, schedule="constant", weight_decay=0.0)


def test_fit_reaches_90_percent_on_digits_in_seconds(digits_data):
    model = create("lenet-300-100", in_features=64)
    cfg = TrainConfig(epochs=5, lr=0.05, batch_size=64, seed=0)
    t0 = time.perf_counter()
    hist = fit(model, digits_data.loader("train", 64), cfg, val_loader=digits_data.loader("val"))
    elapsed = time.perf_counter() - t0
    test = evaluate(model, digits_data.loader("test", 256))
    assert test["accuracy"] > 90.0
    assert test["samples"] == len(digits_data.test[1])
    assert len(hist.epochs) == 5 and hist.last["val_accuracy"] > 85.0
    assert hist.wall_time_s > 0 and elapsed < 30


def test_fit_small_convnet_on_digits(digits_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    fit(model, digits_data.loader("train", 64), TrainConfig(epochs=4, lr=0.05, seed=1))
    assert evaluate(model, digits_data.loader("test", 256))["accuracy"] > 90.0


def test_fit_is_reproducible_with_seed(digits_data):
    cfg = TrainConfig(epochs=1, lr=0.05, seed=3)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create("lenet-300-100", in_features=64)
        fit(model, digits_data.loader("train", 64, seed=3), cfg)
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)


def test_l1_penalty_is_exact_subgradient_step():
    # one SGD step, no momentum, zero data loss: w' = w - lr * l1 * sign(w) for weights only
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, lr=0.1, l1=0.01, **PLAIN)
    fit(model, _one_batch(), cfg, loss_fn=_zero_loss)
    after = model.state_dict()
    for k, w in before.items():
        expect = w - 0.1 * 0.01 * torch.sign(w) if w.dim() > 1 else w
        torch.testing.assert_close(after[k], expect)


def test_l2_weight_decay_skips_biases():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(
        model,
        _one_batch(),
        TrainConfig(epochs=1, lr=0.1, **{**PLAIN, "weight_decay": 0.5}),
        loss_fn=_zero_loss,
    )
    for k, w in before.items():
        expect = w * (1 - 0.1 * 0.5) if w.dim() > 1 else w
        torch.testing.assert_close(model.state_dict()[k], expect)


def test_l1_then_l2_switch():
    # epoch 0: L1 only (no weight decay); epoch 1 onwards: L2 only (Han 2015)
    model = _mlp()
    w0 = model[1].weight.detach().clone()
    lr, l1, wd = 0.1, 0.01, 0.5
    seen_wd = []

    class Spy(Callback):
        def on_train_begin(self, model, optimizer):
            self.opt = optimizer

        def on_step_end(self, model, step):
            seen_wd.append(self.opt.param_groups[0]["weight_decay"])

    cfg = TrainConfig(
        epochs=2, lr=lr, l1=l1, regularization_switch_epoch=1, **{**PLAIN, "weight_decay": wd}
    )
    fit(model, _one_batch(), cfg, loss_fn=_zero_loss, callbacks=[Spy()])
    assert seen_wd == [0.0, wd]
    w1 = w0 - lr * l1 * torch.sign(w0)
    w2 = w1 * (1 - lr * wd)
    torch.testing.assert_close(model[1].weight.detach(), w2)


def test_grad_clip_bounds_the_update_norm():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    lr, clip = 0.1, 0.05

    def big_loss(out, y, x):
        return 1000.0 * nn.functional.cross_entropy(out, y)

    grads = []

    class Spy(Callback):
        def on_after_backward(self, model, step):
            grads.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters())))

    cfg = TrainConfig(epochs=1, lr=lr, grad_clip=clip, **PLAIN)
    fit(model, _one_batch(), cfg, loss_fn=big_loss, callbacks=[Spy()])
    assert grads[0] > clip  # the raw gradient really was larger
    delta = math.sqrt(
        sum(
            float((p.detach() - b).pow(2).sum())
            for p, b in zip(model.parameters(), before, strict=True)
        )
    )
    assert delta == pytest.approx(lr * clip, rel=1e-4)


class _Snap(Callback):
    """Records a copy of the weights at the end of every epoch."""

    def __init__(self, into: list) -> None:
        self.into = into

    def on_epoch_end(self, model, epoch, metrics):
        self.into.append({k: v.clone() for k, v in model.state_dict().items()})


def test_early_stopping_restores_best_epoch():
    # maximising the loss makes the held-out loss grow every epoch: best = epoch 1
    model = _mlp()
    snapshots = []

    def ascend(out, y, x):
        return -nn.functional.cross_entropy(out, y)

    loader = _one_batch(32)
    cfg = TrainConfig(epochs=20, lr=0.5, early_stopping=2, **PLAIN)
    hist = fit(model, loader, cfg, val_loader=loader, loss_fn=ascend, callbacks=[_Snap(snapshots)])
    assert len(hist.epochs) == 3 and hist.best_epoch == 1
    assert hist.epochs[2]["val_loss"] > hist.epochs[1]["val_loss"] > hist.epochs[0]["val_loss"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[0][k], rtol=0, atol=0)


def test_restore_best_keeps_the_starting_weights_when_training_hurts():
    model = _mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def ascend(out, y, x):
        return -nn.functional.cross_entropy(out, y)

    loader = _one_batch(32)
    cfg = TrainConfig(epochs=3, lr=0.5, restore_best=True, **PLAIN)
    hist = fit(model, loader, cfg, val_loader=loader, loss_fn=ascend)
    assert hist.best_epoch == 0 and len(hist.epochs) == 3
    assert max(e["val_accuracy"] for e in hist.epochs) <= hist.start_val_accuracy
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)
    # without the option the damage stays
    hurt = _mlp()
    fit(hurt, loader, cfg.replace(restore_best=False), val_loader=loader, loss_fn=ascend)
    assert not torch.equal(hurt.state_dict()["1.weight"], start["1.weight"])


def test_restore_best_keeps_the_best_epoch():
    model = _mlp()
    snapshots = []

    loader = _one_batch(32)
    cfg = TrainConfig(epochs=6, lr=0.5, restore_best=True, **PLAIN)
    hist = fit(model, loader, cfg, val_loader=loader, callbacks=[_Snap(snapshots)])
    accs = [e["val_accuracy"] for e in hist.epochs]
    assert max(accs) > hist.start_val_accuracy
    assert hist.best_epoch == accs.index(max(accs)) + 1  # first epoch reaching the best
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[hist.best_epoch - 1][k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="restore_best=True"):
        fit(_mlp(), loader, TrainConfig(epochs=1, restore_best=True))


def test_early_stopping_needs_held_out_split():
    with pytest.raises(ValueError, match="early_stopping=3"):
        fit(_mlp(), _one_batch(), TrainConfig(epochs=1, early_stopping=3))


def test_callbacks_are_called_in_order():
    calls = []

    class Rec(Callback):
        def on_train_begin(self, model, optimizer):
            calls.append("begin")

        def on_after_backward(self, model, step):
            assert all(p.grad is not None for p in model.parameters())
            calls.append(f"backward{step}")

        def on_step_end(self, model, step):
            calls.append(f"step{step}")

        def on_epoch_end(self, model, epoch, metrics):
            assert metrics["epoch"] == epoch + 1 and "val_accuracy" in metrics
            calls.append(f"epoch{epoch}")

        def on_train_end(self, model):
            calls.append("end")

    loader = BatchLoader(torch.randn(8, 4), torch.randint(0, 2, (8,)), 4)
    fit(_mlp(), loader, TrainConfig(epochs=2), val_loader=loader, callbacks=[Rec()])
    assert calls == [
        "begin",
        "backward0", "step0", "backward1", "step1", "epoch0",
        "backward2", "step2", "backward3", "step3", "epoch1",
        "end",
    ]  # fmt: skip


def test_params_subset_trains_only_those_and_restores_requires_grad():
    model = _mlp()
    frozen_before = model[1].weight.detach().clone()
    trained_before = model[3].weight.detach().clone()
    fit(model, _one_batch(), TrainConfig(epochs=2, lr=0.1), params=[model[3].weight])
    torch.testing.assert_close(model[1].weight.detach(), frozen_before, rtol=0, atol=0)
    assert not torch.equal(model[3].weight.detach(), trained_before)
    assert all(p.requires_grad for p in model.parameters())


def test_progress_events():
    events = []
    loader = BatchLoader(torch.randn(8, 4), torch.randint(0, 2, (8,)), 4)
    fit(_mlp(), loader, TrainConfig(epochs=2), progress=events.append)
    kinds = [e.kind for e in events]
    steps = [e for e in events if e.kind == "advance" and not e.info.get("epoch_done")]
    done = [e for e in events if e.info.get("epoch_done")]
    assert kinds[0] == "start" and kinds[-1] == "end" and len(steps) == 4
    assert events[0].total == 4 and events[-2].completed == 4
    assert {"epoch", "loss", "acc"} <= set(events[1].info)
    # one event per finished epoch, with the epoch's metrics (the CLI's line per epoch)
    assert [e.info["epoch"] for e in done] == [1, 2] and done[0].info["epochs"] == 2
    assert "train_loss" in done[0].info


def test_evaluate_restores_training_flag_and_matches_manual():
    model = _mlp()
    loader = _one_batch(16)
    for flag in (True, False):
        model.train(flag)
        res = evaluate(model, loader)
        assert model.training is flag
    x, y = loader.x, loader.y
    with torch.no_grad():
        out = model(x)
    assert res["accuracy"] == pytest.approx(100.0 * float((out.argmax(1) == y).float().mean()))
    assert res["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)


def test_evaluate_empty_loader():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(_mlp(), [])


def test_finetune_scales_lr():
    hist = finetune(_mlp(), _one_batch(), TrainConfig(epochs=1, lr=0.2, **PLAIN), lr_scale=0.1)
    assert hist.last["lr"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="lr_scale=0"):
        finetune(_mlp(), _one_batch(), lr_scale=0)


def test_label_smoothing_changes_default_loss():
    losses = []
    for ls in (0.0, 0.3):
        model = _mlp()
        hist = fit(model, _one_batch(), TrainConfig(epochs=1, label_smoothing=ls, **PLAIN))
        losses.append(hist.last["train_loss"])
    model = _mlp()
    x, y = _one_batch().x, _one_batch().y
    with torch.no_grad():
        ref = nn.functional.cross_entropy(model(x), y, label_smoothing=0.3)
    assert losses[1] == pytest.approx(float(ref), rel=1e-5)
    assert losses[0] != pytest.approx(losses[1])


@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", -1),
        ("lr", 0.0),
        ("optimizer", "rmsprop"),
        ("schedule", "linear"),
        ("momentum", 1.0),
        ("grad_clip", 0.0),
        ("label_smoothing", 1.0),
        ("early_stopping", -1),
        ("l1", -0.1),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=f"{field}="):
        TrainConfig(**{field: value})


def test_config_dict_round_trip_and_unknown_field():
    cfg = TrainConfig(epochs=3, grad_clip=1.0, l1=1e-5, regularization_switch_epoch=2)
    assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict(TrainConfig, {"epoch": 3}, where="stage 1")


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle"])
def test_schedules_run(schedule):
    hist = fit(_mlp(), _one_batch(), TrainConfig(epochs=2, schedule=schedule, warmup_epochs=1))
    assert len(hist.epochs) == 2 and all(math.isfinite(e["train_loss"]) for e in hist.epochs)


def test_model_device():
    assert model_device(_mlp()) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")
