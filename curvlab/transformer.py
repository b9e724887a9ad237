"""A small causal transformer language model (the built-in ``"transformer"`` model).

Pre-LayerNorm GPT-style blocks made only of layers curvlab reads with their own kinds:
token and position ``nn.Embedding`` (positions as a ``(N, T)`` index tensor, so each
sequence has its own rows), ``nn.LayerNorm``, and ``nn.Linear`` projections around
``F.scaled_dot_product_attention(is_causal=True)`` (any attention kernel: capture needs
only backward passes).  Outputs ``(N, T, vocab)`` logits, class dimension last.
With ``tie_weights=True`` the head's weight is the token embedding matrix (the head
keeps its own bias); curvlab reads that matrix exactly as one layer used by both
modules (:class:`~curvlab.layers.shared.SharedKind`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import OptionError


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` and ``proj`` are ``nn.Linear`` layers."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise OptionError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, T, width)`` -> ``(N, T, width)``."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with a GELU MLP of ``4·width``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Causal language model: tokens ``(N, T)`` (``T ≤ max_len``) -> logits ``(N, T, vocab)``.

    Args:
        vocab: Vocabulary size (input tokens and output classes).
        max_len: Longest sequence (rows of the position embedding).
        width: Model width.
        depth: Number of blocks.
        heads: Attention heads per block.
        tie_weights: Use the token embedding matrix ``(vocab, width)`` as the head's
            weight (``head.weight is tok.weight``; the head keeps its bias).
    """

    def __init__(
        self,
        vocab: int,
        max_len: int,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        if tie_weights:
            self.head.weight = self.tok.weight

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(n, t)
        h = self.tok(tokens) + self.pos(positions)
        return self.head(self.ln_f(self.blocks(h)))
