"""A small character-level GPT (Radford et al. 2018/2019 decoder-only transformer, in the
spirit of nanoGPT) for plain text: token and position embeddings, pre-norm causal blocks, a
final LayerNorm and an LM head tied to the token embedding."""

from __future__ import annotations

import torch
from torch import nn

from .vit import Block

__all__ = ["CharGPT"]


class CharGPT(nn.Module):
    """``forward(input_ids (B, T)) -> logits (B, T, vocab)``; ``block_size`` the longest context.

    Defaults (vocab 98, context 128, dim 128, depth 4, 4 heads, MLP 4x): about 0.8M parameters.
    """

    def __init__(
        self,
        vocab_size: int = 98,
        block_size: int = 128,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        tie: bool = True,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie:
            self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens: longer than block_size={self.block_size}")
        pos = torch.arange(t, device=input_ids.device)
        h = self.tok(input_ids) + self.pos(pos)[None]  # (B, T, D)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))  # (B, T, V)
