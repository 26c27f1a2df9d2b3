"""Caser student (SPEC section 3, reference implementation).

Embeddings (padding positions zeroed) form a 1 x L x H image; horizontal convolutions of
heights ``heights`` (``filters`` each, ReLU, max-pooled over time) and ``vertical`` vertical
convolutions (L x 1, ReLU) are concatenated, dropout, then Linear(vertical*H + filters*len(heights), N).
``encode`` returns that concatenation, so ``out_dim`` = vertical*H + filters*len(heights)
(112 at the defaults), not H.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dllm2rec.models.embedding import InputEmbedding


class Caser(nn.Module):
    def __init__(self, n_items: int, hidden: int = 64, max_len: int = 10, heights=(2, 3, 4),
                 filters: int = 16, vertical: int = 1, dropout: float = 0.1,
                 llm_dim: int | None = None, ed_weight: float = 0.2, learnable_offset: bool = True,
                 sparse_grad: bool = False):
        super().__init__()
        if any(h < 1 or h > max_len for h in heights):
            raise ValueError(f"Caser heights {list(heights)} must lie in 1..max_len={max_len}")
        self.n_items = n_items
        self.hidden = hidden
        self.max_len = max_len
        self.embed = InputEmbedding(n_items, hidden, llm_dim, ed_weight, learnable_offset, sparse_grad)
        self.horizontal = nn.ModuleList(nn.Conv2d(1, filters, (h, hidden)) for h in heights)
        for conv in self.horizontal:
            nn.init.xavier_normal_(conv.weight)
            nn.init.constant_(conv.bias, 0.1)
        self.vertical = nn.Conv2d(1, vertical, (max_len, 1)) if vertical > 0 else None
        if self.vertical is not None:
            nn.init.xavier_normal_(self.vertical.weight)
            nn.init.constant_(self.vertical.bias, 0.1)
        self.out_dim = filters * len(heights) + vertical * hidden
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(self.out_dim, n_items)

    def encode(self, history: torch.Tensor, lengths: torch.Tensor, llm_hist: torch.Tensor | None = None,
               **ed_inputs) -> torch.Tensor:
        """history Long[B, L=max_len], lengths Long[B] -> Float[B, out_dim]."""
        if history.shape[1] != self.max_len:
            raise ValueError(f"Caser needs histories of length max_len={self.max_len}, got {history.shape[1]}")
        x = self.embed(history, llm_hist, **ed_inputs)
        x = (x * (history < self.n_items).unsqueeze(-1).to(x.dtype)).unsqueeze(1)  # [B, 1, L, H]
        pooled = []
        for conv in self.horizontal:
            h = F.relu(conv(x)).squeeze(3)  # [B, F, L-h+1]
            pooled.append(h.amax(dim=2))
        parts = [torch.cat(pooled, 1)]
        if self.vertical is not None:
            parts.append(F.relu(self.vertical(x)).flatten(1))  # [B, V*H]
        return self.dropout(torch.cat(parts, 1))

    def forward(self, history, lengths, llm_hist=None, **ed_inputs) -> torch.Tensor:
        return self.output(self.encode(history, lengths, llm_hist, **ed_inputs))
