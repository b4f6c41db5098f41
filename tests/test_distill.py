"""Distillation losses against hand computations, gradient scaling, and a tiny end-to-end run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.distill import (
    DistillConfig,
    attention_map,
    attention_transfer_loss,
    distillation_loss,
    kd_loss,
    relational_kd_loss,
)
from nncompress.engine import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    evaluate,
    fit,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _huber(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1, 0.5 * x * x, a - 0.5)


def _logits(seed=0, b=5, k=7):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    t = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (b,), generator=g)
    return s, t, y


# --- Hinton soft-target loss -------------------------------------------------------------


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3), (2.5, 1.0)])
def test_kd_loss_matches_hand_computation(temperature, alpha):
    s, t, y = _logits()
    S, Tl, Y = s.numpy(), t.numpy(), y.numpy()
    p_s, p_t = _softmax(S / temperature), _softmax(Tl / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s))) / len(S)  # batch mean of KL(p_t || p_s)
    ce = -np.mean(np.log(_softmax(S)[np.arange(len(Y)), Y]))
    expect = alpha * temperature**2 * kl + (1 - alpha) * ce
    got = kd_loss(s, t, y, temperature=temperature, alpha=alpha)
    assert float(got) == pytest.approx(expect, rel=1e-10)


def test_kd_loss_alpha_zero_is_cross_entropy_and_identical_logits_give_zero_soft_term():
    s, t, y = _logits()
    ce = nn.functional.cross_entropy(s, y)
    assert float(kd_loss(s, t, y, alpha=0.0)) == pytest.approx(float(ce), rel=1e-12)
    assert float(kd_loss(s, s.clone(), None, alpha=1.0)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 10.0])
def test_kd_gradient_is_T_times_probability_difference(temperature):
    # d/ds [T^2 KL(softmax(t/T) || softmax(s/T))] = T (softmax(s/T) - softmax(t/T)) / B
    s, t, _ = _logits(1)
    s.requires_grad_(True)
    kd_loss(s, t, None, temperature=temperature, alpha=1.0).backward()
    expect = temperature * (torch.softmax(s / temperature, 1) - torch.softmax(t / temperature, 1))
    torch.testing.assert_close(s.grad, expect.detach() / len(s))


def test_kd_gradient_scale_independent_of_temperature():
    # Hinton 2015 sec. 2.1: at high T, with zero-mean logits, the soft gradient tends to
    # (s - t) / (K B) once multiplied by T^2; without T^2 it would shrink as 1/T^2.
    s, t, _ = _logits(2)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    b, k = s.shape
    limit = (s - t) / (k * b)
    grads = {}
    for temperature in (50.0, 200.0):
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, None, temperature=temperature, alpha=1.0).backward()
        grads[temperature] = x.grad
    torch.testing.assert_close(grads[200.0], limit, rtol=0.02, atol=0.02 * float(limit.abs().max()))
    ratio = grads[50.0].norm() / grads[200.0].norm()
    assert float(ratio) == pytest.approx(1.0, abs=0.05)
    # and the unscaled KL's gradient does shrink by the factor T^2 = 16
    x = s.clone().requires_grad_(True)
    (kd_loss(x, t, None, temperature=200.0, alpha=1.0) / 200.0**2).backward()
    assert float(x.grad.norm() * 200.0**2 / grads[200.0].norm()) == pytest.approx(1.0, rel=1e-9)


def test_kd_teacher_gets_no_gradient():
    s, t, y = _logits()
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t, y).backward()
    assert s.grad is not None and t.grad is None


def test_kd_loss_validates_inputs():
    s, t, y = _logits()
    with pytest.raises(ValueError, match="temperature=0"):
        kd_loss(s, t, y, temperature=0)
    with pytest.raises(ValueError, match="alpha=1.5"):
        kd_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="targets=None"):
        kd_loss(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, t[:, :3], y)


# --- attention transfer --------------------------------------------------------------------


def _at_reference(s: np.ndarray, t: np.ndarray, p: float) -> float:
    def q(a):
        m = (np.abs(a) ** p).sum(axis=1).reshape(len(a), -1)  # (B, H*W)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    return float(np.mean(np.linalg.norm(q(s) - q(t), axis=1)))


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_transfer_matches_hand_computation(p):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    t = torch.randn(3, 9, 5, 6, generator=g, dtype=torch.float64)  # channels may differ
    got = attention_transfer_loss(s, t, p=p)
    assert float(got) == pytest.approx(_at_reference(s.numpy(), t.numpy(), p), rel=1e-10)
    amap = attention_map(s, p)
    assert amap.shape == (3, 30)
    torch.testing.assert_close(amap.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_attention_transfer_sums_pairs_and_is_scale_invariant():
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g))
             for _ in range(2)]  # fmt: skip
    total = attention_transfer_loss([a for a, _ in pairs], [b for _, b in pairs])
    parts = sum(float(attention_transfer_loss(a, b)) for a, b in pairs)
    assert float(total) == pytest.approx(parts, rel=1e-6)
    t = pairs[0][1]
    # the same attention (teacher scaled by a positive constant) gives zero loss
    assert float(attention_transfer_loss(3.0 * t, t)) == pytest.approx(0.0, abs=1e-6)


def test_attention_transfer_gradient_flows_to_student_only():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 6, 4, 4, requires_grad=True)
    attention_transfer_loss(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and t.grad is None


def test_attention_transfer_validates_shapes():
    with pytest.raises(ValueError, match="spatial sizes must match"):
        attention_transfer_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="same number"):
        attention_transfer_loss([torch.randn(2, 3, 4, 4)], [])


# --- relational KD ---------------------------------------------------------------------------


def _rkd_reference(s: np.ndarray, t: np.ndarray, wd: float, wa: float) -> float:
    n = len(s)

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        mu = d[~np.eye(n, dtype=bool)].mean()
        return d / mu

    def angles(e):
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            if i == j or k == j:
                continue  # degenerate: the unit difference vector is zero
            a, b = e[i] - e[j], e[k] - e[j]
            out[i, j, k] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        return out

    return float(wd * _huber(dist(s) - dist(t)).mean() + wa * _huber(angles(s) - angles(t)).mean())


@pytest.mark.parametrize("wd,wa", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_relational_kd_matches_hand_computation(wd, wa):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.randn(6, 7, generator=g, dtype=torch.float64) * 5  # widths may differ
    got = relational_kd_loss(s, t, distance_weight=wd, angle_weight=wa)
    assert float(got) == pytest.approx(_rkd_reference(s.numpy(), t.numpy(), wd, wa), rel=1e-9)


def test_relational_kd_invariant_to_similarity_transforms():
    # rotating, scaling and translating the embedding keeps all distance ratios and angles
    g = torch.Generator().manual_seed(4)
    t = torch.randn(8, 5, generator=g, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    s = 3.0 * t @ rot + 1.5
    assert float(relational_kd_loss(s, t)) == pytest.approx(0.0, abs=1e-9)
    assert float(relational_kd_loss(torch.randn(8, 5, dtype=torch.float64), t)) > 0.1


def test_relational_kd_gradient_finite_with_duplicate_rows():
    s = torch.randn(5, 3)
    s[1] = s[0]
    s.requires_grad_(True)
    t = torch.randn(5, 4)
    relational_kd_loss(s, t).backward()
    assert torch.isfinite(s.grad).all()


def test_relational_kd_validates():
    with pytest.raises(ValueError, match="N >= 2"):
        relational_kd_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="same batch size"):
        relational_kd_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="distance_weight=-1"):
        relational_kd_loss(torch.randn(4, 3), torch.randn(4, 3), distance_weight=-1)


# --- config and the engine loss ---------------------------------------------------------


def test_distill_config_validation_and_round_trip():
    cfg = DistillConfig(temperature=3.0, alpha=0.7, label_free=True)
    assert config_from_dict(DistillConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="temperature=0"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="alpha=1.1"):
        DistillConfig(alpha=1.1)
    with pytest.raises(ConfigError, match="label_free='yes'"):
        DistillConfig(label_free="yes")
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict(DistillConfig, {"temp": 2})


def _net(seed, hidden=16, in_features=64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, 10),
    )  # fmt: skip


def test_distillation_loss_runs_frozen_teacher_in_eval_mode():
    teacher, student = _net(0), _net(1)
    teacher.train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    cfg = DistillConfig(temperature=2.0, alpha=0.6)
    loss_fn = distillation_loss(teacher, cfg)
    out = student(x)
    loss = loss_fn(out, y, x)
    assert teacher.training  # its flag is restored
    with torch.no_grad():
        t_logits = teacher.eval()(x)  # eval mode: dropout off, so deterministic
    teacher.train()
    torch.testing.assert_close(loss, kd_loss(out, t_logits, y, 2.0, 0.6))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_label_free_ignores_targets():
    teacher, student = _net(0), _net(1)
    x = torch.randn(6, 1, 8, 8)
    out = student(x)
    fn = distillation_loss(teacher, DistillConfig(temperature=3.0, alpha=0.2, label_free=True))
    a = fn(out, torch.zeros(6, dtype=torch.long), x)
    b = fn(out, torch.full((6,), 9), x)
    with torch.no_grad():
        t_logits = teacher.eval()(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, kd_loss(out, t_logits, None, 3.0, 1.0))


def test_distillation_loss_rejects_non_module():
    with pytest.raises(TypeError, match="teacher="):
        distillation_loss(lambda x: x)


@pytest.fixture(scope="module")
def digits_teacher(digits_data):
    teacher = _net(0, hidden=128)
    fit(teacher, digits_data.loader("train", 64), TrainConfig(epochs=6, lr=0.05, seed=0))
    acc = evaluate(teacher, digits_data.loader("test", 512))["accuracy"]
    assert acc > 93.0
    return teacher


@pytest.mark.parametrize("label_free", [False, True])
def test_distilling_a_tiny_student_on_digits(digits_data, digits_teacher, label_free):
    student = _net(5, hidden=12)
    cfg = TrainConfig(epochs=6, lr=0.05, seed=1)
    loss_fn = distillation_loss(digits_teacher, DistillConfig(4.0, 0.9, label_free=label_free))
    hist = fit(student, digits_data.loader("train", 64), cfg, loss_fn=loss_fn)
    acc = evaluate(student, digits_data.loader("test", 512))["accuracy"]
    assert acc > 85.0, acc
    assert hist.epochs[-1]["train_loss"] < hist.epochs[0]["train_loss"]
    # the student learned from the teacher: it agrees with it on most test images
    x = digits_data.test[0]
    with torch.no_grad():
        agree = (student.eval()(x).argmax(1) == digits_teacher.eval()(x).argmax(1)).float().mean()
    assert float(agree) > 0.85


def test_cli_distill_from_teacher_checkpoint(digits_data, digits_teacher, tmp_path, capsys):
    import json

    from nncompress.cli import main
    from nncompress.engine import load_checkpoint, save_checkpoint

    ckpt = save_checkpoint(
        digits_teacher, tmp_path / "teacher.safetensors", dataset=digits_data.describe()
    )
    out = tmp_path / "student.safetensors"
    args = ["distill", str(ckpt), "--student", "lenet-300-100", "--epochs", "3", "--quiet"]
    assert main([*args, "--alpha", "1.5", "--out", str(out)]) == 2
    assert "alpha=1.5" in capsys.readouterr().err
    assert main([*args, "--temperature", "3", "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test_accuracy"] > 85.0 and res["teacher_test_accuracy"] > 93.0
    student, side = load_checkpoint(out)
    assert side["architecture"]["kwargs"] == {"num_classes": 10, "in_features": 64}
    assert side["extra"]["distill"]["temperature"] == 3.0
    assert evaluate(student, digits_data.loader("test", 512))["accuracy"] == pytest.approx(
        res["test_accuracy"]
    )
