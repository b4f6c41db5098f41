"""Tiny random-config Hugging Face models for tests (built in memory, never downloaded)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 96


def bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def vit(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return transformers.ViTModel(cfg).eval()


def text_batches(n: int = 4, batch: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def image_batches(n: int = 4, batch: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 1, 16, 16, generator=g)} for _ in range(n)]
