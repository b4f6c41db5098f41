"""Batches as users hold them (tensors, tuples, dicts), any-output distillation, weight sharing
of embeddings and tied weights, and .ncz round trips of any state dict."""

import copy

import pytest
import torch
from torch import nn

from hf_tiny import bert, text_batches, transformers
from nncompress.distill import OutputDistillConfig, output_distillation_loss, output_loss
from nncompress.engine import TrainConfig, evaluate, fit
from nncompress.engine.batches import call_inputs, main_output, split_batch
from nncompress.io import EncodeConfig, decode_bytes, encode_state_dict, round_for_storage_
from nncompress.lowrank import refit_
from nncompress.lowrank.svd import svd_linear
from nncompress.quant import KMeansConfig, share_weights_, shared_layers
from nncompress.quant.weight_only import WeightOnlyConfig, quantize_weights_


def test_split_batch_rules():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert split_batch(x)[0][0] is x
    args, kw, t = split_batch((x, y))
    assert args[0] is x and kw == {} and t is y
    args, kw, t = split_batch({"input_ids": x, "labels": y})
    assert args == () and set(kw) == {"input_ids"} and t is y
    args, kw, t = split_batch(((x, x), y))
    assert len(args) == 2 and t is y
    assert call_inputs(lambda a, b=None: (a, b), {"a": 1, "b": 2}) == (1, 2)
    with pytest.raises(TypeError, match="batch of type int"):
        split_batch(3)


class _KwClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, input_ids):
        return self.fc(self.emb(input_ids).mean(1))


def test_fit_and_evaluate_take_dict_batches():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (64, 5), generator=g)
    labels = ids[:, 0] % 3
    batches = [
        {"input_ids": ids[i : i + 16], "labels": labels[i : i + 16]} for i in range(0, 64, 16)
    ]
    model = _KwClassifier()
    before = evaluate(model, batches)["accuracy"]
    hist = fit(model, batches, TrainConfig(epochs=30, lr=0.1, optimizer="adam"))
    after = evaluate(model, batches)
    assert after["accuracy"] > max(before, 60.0) and "train_accuracy" in hist.last


def test_fit_uses_the_loss_a_hf_model_computes():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.arange(16).repeat(8, 1) % 32  # a fully predictable sequence
    batches = [{"input_ids": ids, "labels": ids}]
    start = evaluate(model, batches)
    assert "accuracy" not in start
    hist = fit(model, batches * 4, TrainConfig(epochs=10, lr=1e-2, optimizer="adamw"))
    assert "train_accuracy" not in hist.last
    assert evaluate(model, batches)["loss"] < 0.5 * start["loss"]


def test_output_loss_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    assert output_loss(s, t, "mse") == pytest.approx(float(((s - t) ** 2).mean()))
    cos = nn.functional.cosine_similarity(s, t, dim=-1)
    assert output_loss(s, t, "cosine") == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    T = 2.0
    pt = torch.softmax(t / T, -1)
    kl = (pt * (pt.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert output_loss(s, t, "kl", temperature=T) == pytest.approx(float(kl), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    per = ((s - t) ** 2).mean(-1)
    assert output_loss(s, t, "mse", mask=mask) == pytest.approx(
        float(per[mask.bool()].mean()), rel=1e-6
    )
    assert output_loss(t, t, "kl") == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_distilling_hidden_states_of_a_quantized_bert(kind):
    teacher = bert()
    student = copy.deepcopy(teacher)
    calib = text_batches(4, seed=0)
    quantize_weights_(
        student, WeightOnlyConfig(bits=3, group_size=32, method="rtn", embeddings=False)
    )
    # fine-tune only the float parameters (LayerNorms, biases); the codes stay
    cfg = OutputDistillConfig(loss=kind, output="last_hidden_state")
    loss_fn = output_distillation_loss(teacher, cfg)

    def total(m):
        with torch.no_grad():
            return sum(float(loss_fn(call_inputs(m, b), None, b)) for b in calib)

    before = total(student)
    params = [p for n, p in student.named_parameters() if "LayerNorm" in n or "bias" in n]
    fit(
        student,
        calib,
        TrainConfig(epochs=10, lr=1e-3, optimizer="adam", weight_decay=0.0),
        loss_fn=loss_fn,
        train_mode=False,
        params=params,
    )
    assert total(student) < 0.9 * before
    assert not teacher.training


class _DictMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_refit_takes_dict_batches():
    torch.manual_seed(0)
    ref = _DictMLP()
    model = copy.deepcopy(ref)
    model.a = svd_linear(ref.a, 4)
    calib = [{"x": torch.randn(32, 16) @ torch.randn(16, 16)} for _ in range(4)]
    res = refit_(model, ref, calib, ["a"])
    assert res[0].error_after < res[0].error_before


def test_share_weights_covers_embeddings_16_bits_wildcards_and_ties():
    cfg = transformers.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    rep = share_weights_(
        model,
        KMeansConfig(bits_fc=4, bits_embedding=10, per_layer={"transformer.h.*.mlp.c_fc": 9}),
    )
    bits = {r.name: r.bits for r in rep.layers}
    assert bits["transformer.wte"] == 10 and bits["transformer.h.1.mlp.c_fc"] == 9
    assert bits["transformer.h.0.attn.c_attn"] == 4 and "lm_head" not in bits  # tied: one entry
    layers = shared_layers(model)
    assert layers["lm_head"] is layers["transformer.wte"]
    data, report = encode_state_dict(model)
    assert report.tensor("lm_head.weight").scheme == "alias"
    assert report.tensor("transformer.wte.weight").scheme == "codebook"  # 1024 values > 256
    assert report.tensor("transformer.h.0.mlp.c_fc.weight").scheme == "codebook"
    state, _ = decode_bytes(data)
    with torch.no_grad():
        assert torch.equal(state["transformer.wte.weight"], model.transformer.wte.weight)
        assert torch.equal(state["lm_head.weight"], model.transformer.wte.weight)


def test_round_for_storage_keeps_shared_and_quantized_parametrizations():
    model = bert()
    share_weights_(model, KMeansConfig(bits_fc=4), filter=lambda n, m: "attention" in n)
    quantize_weights_(
        model, WeightOnlyConfig(bits=4, group_size=32, method="rtn", exclude=("*attention*",))
    )
    config = EncodeConfig(codebook_dtype="fp16", dense_dtype="fp16")
    round_for_storage_(model, config)
    data, _ = encode_state_dict(model, config)
    state, _ = decode_bytes(data)
    from nncompress.engine.modspec import folded_copy

    for k, v in folded_copy(model).state_dict().items():
        assert torch.equal(state[k], v), k


def test_any_state_dict_round_trips():
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(5, 3, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "i64": torch.arange(7),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "u16": torch.arange(6, dtype=torch.int32).to(torch.uint16),
        "c64": torch.randn(3, generator=g) + 1j * torch.randn(3, generator=g),
        "f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "twin": None,
    }
    sd["twin"] = sd["f32"].clone()
    data, report = encode_state_dict(sd)
    out, _ = decode_bytes(data)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    assert report.tensor("twin").scheme == "alias"
    assert main_output({"logits": sd["f32"]}) is sd["f32"]
