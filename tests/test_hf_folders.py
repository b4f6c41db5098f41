"""Hugging Face folders in and out, offline: save / decode / from_pretrained round trips,
the compress / decode --hf-out / eval commands, fidelity metrics and INT8 onnxruntime."""

import json

import pytest
import torch

from hf_tiny import VOCAB, bert, gpt2, image_batches, text_batches, transformers, vit
from nncompress.cli import main
from nncompress.core.modules import folded_copy
from nncompress.io import decode_file, save_compressed
from nncompress.io.hf import (
    decode_to_hf_folder,
    hf_metadata,
    is_hf_folder,
    load_hf_folder,
    model_from_hf_metadata,
)
from nncompress.quant import quantize_weights_
from nncompress.quant.weight_only import WeightOnlyConfig
from nncompress.stats.fidelity import fidelity

CASES = {
    "bert": (bert, text_batches, transformers.AutoModel),
    "gpt2": (gpt2, text_batches, transformers.AutoModelForCausalLM),
    "vit": (vit, image_batches, transformers.AutoModel),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_decode_from_pretrained_round_trip_is_bit_exact(name, tmp_path):
    make, batches, auto = CASES[name]
    make().save_pretrained(tmp_path / "orig")
    assert is_hf_folder(tmp_path / "orig")
    model, config = load_hf_folder(tmp_path / "orig")
    quantize_weights_(model, WeightOnlyConfig(bits=4, group_size=32), batches(2))
    report = save_compressed(model, tmp_path / "m.ncz", metadata=hf_metadata(model, config))
    state, metadata = decode_file(tmp_path / "m.ncz")
    plain = folded_copy(model).state_dict()
    for k, v in plain.items():
        assert torch.equal(state[k], v), k
    rebuilt = model_from_hf_metadata(metadata)
    rebuilt.load_state_dict(state, strict=True)
    decode_to_hf_folder(tmp_path / "m.ncz", tmp_path / "out")
    loaded = auto.from_pretrained(tmp_path / "out").eval()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, plain[k]), k
    b = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**b)[0], model(**b)[0])
    if name == "gpt2":  # tied embedding / LM head: stored once
        assert report.tensor("lm_head.weight").scheme == "alias"
        assert report.tensor("lm_head.weight").total_bytes == 0
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    with pytest.raises(Exception, match="not overwritten"):
        decode_to_hf_folder(tmp_path / "m.ncz", tmp_path / "out")


def test_fidelity_metrics_and_perplexity():
    ref = gpt2()
    same = fidelity(ref, gpt2(), text_batches(2))
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6) and same["kl"] == pytest.approx(
        0, abs=1e-9
    )
    assert same["perplexity_increase"] == pytest.approx(0.0, abs=1e-9)
    q = gpt2()
    quantize_weights_(q, WeightOnlyConfig(bits=2, group_size=64, method="rtn"))
    worse = fidelity(ref, q, text_batches(2))
    assert worse["cosine"] < 1 and worse["kl"] > 0
    # perplexity by hand for one batch
    b = text_batches(1)[0]
    with torch.no_grad():
        logits = ref(**b).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), b["input_ids"][:, 1:].reshape(-1)
    )
    assert fidelity(ref, ref, [b])["perplexity_ref"] == pytest.approx(float(nll.exp()), rel=1e-5)
    v = fidelity(vit(), vit(1), image_batches(1))
    assert "perplexity" not in v and -1 <= v["cosine"] <= 1


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny BERT folder with its own WordPiece tokenizer files, and a text file."""
    d = tmp_path_factory.mktemp("hf")
    words = [f"w{i}" for i in range(VOCAB - 5)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(d / "bert")
    bert().save_pretrained(d / "bert")
    g = torch.Generator().manual_seed(0)
    lines = [
        " ".join(words[int(i)] for i in torch.randint(0, 60, (12,), generator=g)) for _ in range(48)
    ]
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    return d


def test_compress_decode_eval_commands(bert_folder, tmp_path, capsys):
    d = bert_folder
    rc = main(
        [
            "compress",
            str(d / "bert"),
            "--out",
            str(tmp_path / "c"),
            "--target-ratio",
            "6",
            "--calibration",
            str(d / "text.txt"),
            "--group-size",
            "32",
            "--batch-size",
            "8",
            "--sensitivity-batches",
            "2",
            "--quiet",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    size = (tmp_path / "c" / "model.ncz").stat().st_size
    assert size == summary["bytes"] <= summary["budget"] and summary["ratio"] >= 6
    rc = main(
        [
            "decode",
            str(tmp_path / "c" / "model.ncz"),
            "--hf-out",
            str(tmp_path / "h"),
            "--tokenizer-from",
            str(d / "bert"),
        ]
    )
    assert rc == 0
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "h")
    assert type(loaded).__name__ == "BertModel"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "h")  # copied with the weights
    assert tok("w1 w2")["input_ids"][1:3] == [6, 7]
    capsys.readouterr()
    rc = main(
        [
            "eval",
            str(tmp_path / "c" / "model.ncz"),
            "--reference",
            str(d / "bert"),
            "--text",
            str(d / "text.txt"),
            "--json",
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.5 < res["cosine"] <= 1.0 and res["rel_error"] > 0
    # bad input: a clear error before any work, nothing overwritten
    rc = main(
        [
            "compress",
            str(d / "bert"),
            "--out",
            str(tmp_path / "c"),
            "--calibration",
            str(d / "text.txt"),
            "--quiet",
        ]
    )
    assert rc == 2 and "not overwritten" in capsys.readouterr().err


def test_int8_dynamic_onnxruntime_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    from nncompress.quant.onnx_dynamic import (
        compare_onnx,
        export_transformer_onnx,
        quantize_onnx_dynamic,
    )

    model = bert()
    ex = text_batches(1)[0]
    export_transformer_onnx(model, ex, tmp_path / "f.onnx")
    quantize_onnx_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx")
    res = compare_onnx(model, tmp_path / "f.onnx", tmp_path / "q.onnx", ex, repeats=3, warmup=1)
    assert res["fp32_cosine_to_eager"] > 0.99999
    assert res["int8_cosine_to_eager"] > 0.99
    assert res["int8_bytes"] < res["fp32_bytes"]
