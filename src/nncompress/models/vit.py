"""A ViT-tiny for 28x28 grey images (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"),
small enough to train on a CPU in minutes.

Patches of ``patch x patch`` pixels are flattened and embedded by a Linear layer, a class
token and learned position embeddings are added, pre-norm transformer blocks (multi-head
self-attention, GELU MLP) follow, and the class token's final LayerNorm feeds a Linear head.
Every projection is an ``nn.Linear``, so weight-only quantization, Wanda and whitened SVD
apply to all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Block", "ViTTiny"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (``F.scaled_dot_product_attention``)."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)  # (B,T,H,Dh)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
        )  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViTTiny(nn.Module):
    """ViT for ``in_channels x image_size x image_size`` images.

    Defaults (28x28, patch 7 -> 16 tokens + class token, dim 128, depth 6, 4 heads, MLP 2x):
    about 0.8M parameters.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch: int = 7,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be divisible by patch={patch}")
        self.patch = patch
        n = (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        p = self.patch
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, C*p*p)
        h = self.embed(patches)  # (B, N, D)
        h = torch.cat([self.cls.expand(b, -1, -1), h], dim=1) + self.pos  # (B, N+1, D)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 0]))  # (B, K)
