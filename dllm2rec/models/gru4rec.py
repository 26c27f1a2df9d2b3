"""GRU4Rec student (SPEC section 3): item embedding -> 1-layer GRU -> last hidden state -> Linear.

The reference packs the padded history; a GRU is causal, so running it over the right-padded
sequence and reading the output at position len-1 gives the same state as the packed run's last
hidden state, without the sort/pack cost. The reference GRU4Rec has no dropout; none is applied.
"""
from __future__ import annotations

import torch
from torch import nn

from dllm2rec.models.embedding import InputEmbedding


class GRU4Rec(nn.Module):
    def __init__(self, n_items: int, hidden: int = 64, llm_dim: int | None = None,
                 ed_weight: float = 0.2, learnable_offset: bool = True, num_layers: int = 1,
                 sparse_grad: bool = False):
        super().__init__()
        self.n_items = n_items
        self.hidden = hidden
        self.out_dim = hidden
        self.embed = InputEmbedding(n_items, hidden, llm_dim, ed_weight, learnable_offset, sparse_grad)
        self.gru = nn.GRU(hidden, hidden, num_layers=num_layers, batch_first=True)
        self.output = nn.Linear(hidden, n_items)

    def encode(self, history: torch.Tensor, lengths: torch.Tensor, llm_hist: torch.Tensor | None = None,
               **ed_inputs) -> torch.Tensor:
        """history Long[B, L], lengths Long[B] (1..L) -> Float[B, H]."""
        x = self.embed(history, llm_hist, **ed_inputs)
        out, _ = self.gru(x)
        last = (lengths.clamp(min=1) - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        return out.gather(1, last).squeeze(1)

    def forward(self, history, lengths, llm_hist=None, **ed_inputs) -> torch.Tensor:
        return self.output(self.encode(history, lengths, llm_hist, **ed_inputs))
