"""Weight-only quantization of tiny random Hugging Face models (no fx tracing, no downloads)."""

import copy

import pytest
import torch

from hf_tiny import bert, gpt2, image_batches, text_batches, vit
from nncompress.engine.batches import main_output, run_model
from nncompress.engine.modspec import folded_copy
from nncompress.io import decode_bytes, encode_state_dict
from nncompress.quant.weight_only import WeightOnlyConfig, quantize_weights_, quantized_layers

CASES = {
    "bert": (bert, text_batches),
    "gpt2": (gpt2, text_batches),
    "vit": (vit, image_batches),
}


def _out(model, batches):
    with torch.no_grad():
        return torch.cat([main_output(run_model(model, b)).flatten(1) for b in batches])


@pytest.mark.parametrize("name", sorted(CASES))
def test_gptq_runs_8bit_matches_and_round_trips(name):
    make, batches = CASES[name]
    model = make()
    calib, held = batches(4, seed=0), batches(2, seed=1)
    ref = _out(model, held)
    m8 = copy.deepcopy(model)
    rep = quantize_weights_(m8, WeightOnlyConfig(bits=8, group_size=32), calib)
    assert rep.layers and all(r.method == "gptq" for r in rep.layers if r.kind != "embedding")
    assert float((_out(m8, held) - ref).norm() / ref.norm()) < 1e-2
    # the comparison leaves embeddings out (both methods round them the same way)
    m3 = copy.deepcopy(model)
    cfg = WeightOnlyConfig(bits=3, group_size=32, method="rtn", embeddings=False)
    quantize_weights_(m3, cfg, calib)
    m3g = copy.deepcopy(model)
    quantize_weights_(m3g, WeightOnlyConfig(bits=3, group_size=32, embeddings=False), calib)
    err_rtn = float((_out(m3, held) - ref).norm())
    err_gptq = float((_out(m3g, held) - ref).norm())
    assert err_gptq < err_rtn  # on held-out batches, not only the calibration ones
    quantize_weights_(m3g, WeightOnlyConfig(bits=3, group_size=32, method="rtn"))  # embeddings
    data, report = encode_state_dict(m3g)
    state, _ = decode_bytes(data)
    plain = folded_copy(m3g).state_dict()
    assert set(state) == set(plain)
    for k, v in plain.items():
        assert torch.equal(state[k], v), k
    assert report.ratio > 4  # 3-bit codes, fp16 scales per 32; LayerNorms, biases in fp32


def test_gpt2_conv1d_and_tied_lm_head():
    model = gpt2()
    quantize_weights_(model, WeightOnlyConfig(bits=4, group_size=32), text_batches(3))
    q = quantized_layers(model)
    assert q["lm_head"] is q["transformer.wte"]
    assert q["transformer.h.0.attn.c_attn"].transpose  # HF Conv1D stores in x out
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    _, report = encode_state_dict(model)
    assert report.tensor("lm_head.weight").scheme == "alias"
    assert report.tensor("transformer.wte.weight").scheme == "affine"
    assert report.tensor("transformer.h.1.mlp.c_fc.weight").scheme == "affine"
