"""The transformer zoo models and the Debian text corpus."""

import pytest
import torch

from nncompress.data.corpus import debian_text, lm_batches, strip_roff
from nncompress.engine import load_checkpoint, save_checkpoint
from nncompress.models import create


def test_strip_roff_keeps_text_and_drops_markup():
    page = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n.B \\-a\nall\n'
    assert strip_roff(page) == "NAME\nls - list directory contents\n-a\nall"


def test_corpus_splits_by_file_and_batches():
    c = debian_text(max_man_pages=60)
    assert c.vocab_size > 50 and c.chars[0] == "\x00"
    assert len(c.train) > len(c.val) > 0 and len(c.test) > 0
    text = "".join(c.chars[i] for i in c.train[:2000].tolist())
    assert "GNU" in text or "License" in text or "license" in text
    ev = lm_batches(c.val, 32, 4)
    assert ev[0]["input_ids"].shape == (4, 33)
    assert torch.equal(ev[0]["input_ids"][0], c.val[:33])
    tr = lm_batches(c.train, 32, 4, n_batches=3, seed=0)
    assert len(tr) == 3 and torch.equal(
        tr[0]["input_ids"], lm_batches(c.train, 32, 4, n_batches=3, seed=0)[0]["input_ids"]
    )


@pytest.mark.parametrize("name", ["vit-tiny", "char-gpt"])
def test_zoo_models_run_and_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create(name)
    x = torch.randn(2, 1, 28, 28) if name == "vit-tiny" else torch.randint(0, 98, (2, 20))
    y = model(x)
    assert y.shape == ((2, 10) if name == "vit-tiny" else (2, 20, 98))
    save_checkpoint(model, tmp_path / "m.safetensors", model_name=name)
    back, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(back(x), y)
    if name == "char-gpt":  # the tied head survives the checkpoint
        assert back.head.weight is back.tok.weight
    # non-default constructor arguments are recorded, checked and rebuilt
    kw = {"dim": 32, "depth": 1, "heads": 2}
    kw |= {"vocab_size": 50, "tie": False} if name == "char-gpt" else {"patch": 4}
    small = create(name, **kw)
    save_checkpoint(small, tmp_path / "s.safetensors", model_name=name, model_kwargs=kw)
    again, _ = load_checkpoint(tmp_path / "s.safetensors")
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())
    with pytest.raises(ValueError, match="tie"):
        create("char-gpt", tie=1)


def test_char_gpt_is_causal():
    torch.manual_seed(0)
    model = create("char-gpt").eval()
    x = torch.randint(0, 98, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % 98
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :10], model(x2)[0, :10], atol=1e-6)
