"""SASRec student (SPEC section 3; the DROS/DLLM2Rec reference implementation).

x = item_emb + pos_emb -> embedding dropout -> zero padded positions; then per block:
  q = LayerNorm_1(x); attention with queries q, keys/values x, logits / sqrt(H) (the reference
  scales by the full hidden size even with several heads), key-padding + causal masks, softmax,
  query (padding) mask, attention dropout, residual onto q;
  position-wise feed-forward on LayerNorm_2(.) (two 1x1 convolutions, ReLU, dropout, residual,
  LayerNorm), zero padded positions;
then a final LayerNorm and the state at position len-1.

Masks come from the ids (padding = N). The reference derives them from ``sum(x) != 0``, which
is the same for the keys (padded positions are zeroed) and, for the queries, the same until
LayerNorm_1 learns a non-zero bias; the id mask is the intended behaviour.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dllm2rec.models.embedding import InputEmbedding

_NEG = -(2.0 ** 32) + 1  # reference fill value for masked attention logits


class _Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}")
        self.hidden, self.heads = hidden, num_heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """queries Float[B, Q, H], keys Float[B, L, H], valid Bool[B, L] -> Float[B, Q, H].

        ``query_pos`` Long[B, Q]: the positions of the queries (default: Q = L, every position)."""
        b, Q, H = queries.shape
        L = keys.shape[1]
        h, d = self.heads, H // self.heads
        q = self.q(queries).view(b, Q, h, d).transpose(1, 2)  # [B, h, Q, d]
        k = self.k(keys).view(b, L, h, d).transpose(1, 2)
        v = self.v(keys).view(b, L, h, d).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / self.hidden ** 0.5  # [B, h, Q, L]
        if query_pos is None:
            causal = torch.ones(L, L, dtype=torch.bool, device=queries.device).tril()
            q_valid = valid
        else:  # key j is visible from query position p iff j <= p
            causal = (torch.arange(L, device=queries.device) <= query_pos[:, :, None])[:, None]  # [B, 1, Q, L]
            q_valid = valid.gather(1, query_pos)
        allowed = causal & valid[:, None, None, :]  # key padding + causality
        attn = torch.softmax(logits.masked_fill(~allowed, _NEG), dim=-1)
        attn = attn * q_valid[:, None, :, None].to(attn.dtype)  # query mask
        out = (self.dropout(attn) @ v).transpose(1, 2).reshape(b, Q, H)
        return out + queries


class _FeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Conv1d(hidden, hidden, 1)
        self.w2 = nn.Conv1d(hidden, hidden, 1)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A 1x1 convolution over time is a Linear on each position; F.linear on the squeezed
        # kernels is the same function (same parameters as the reference Conv1d layers) and
        # avoids the much slower CPU convolution backward.
        y = F.relu(F.linear(x, self.w1.weight.squeeze(-1), self.w1.bias))
        y = F.linear(y, self.w2.weight.squeeze(-1), self.w2.bias)
        return self.norm(self.dropout(y) + x)


class _Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.ln_q = nn.LayerNorm(hidden)
        self.attn = _Attention(hidden, num_heads, dropout)
        self.ln_ff = nn.LayerNorm(hidden)
        self.ff = _FeedForward(hidden, dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x Float[B, L, H] -> Float[B, L, H], or Float[B, Q, H] for the ``query_pos`` Long[B, Q] rows only."""
        if query_pos is None:
            a = self.attn(self.ln_q(x), x, valid)
            return self.ff(self.ln_ff(a)) * valid.unsqueeze(-1).to(x.dtype)
        xq = x.gather(1, query_pos[:, :, None].expand(-1, -1, x.shape[-1]))
        a = self.attn(self.ln_q(xq), x, valid, query_pos)
        return self.ff(self.ln_ff(a)) * valid.gather(1, query_pos).unsqueeze(-1).to(x.dtype)


class SASRec(nn.Module):
    def __init__(self, n_items: int, hidden: int = 64, max_len: int = 10, num_heads: int = 1,
                 num_blocks: int = 1, dropout: float = 0.1, llm_dim: int | None = None,
                 ed_weight: float = 0.2, learnable_offset: bool = True, sparse_grad: bool = False,
                 readout_only: bool = False):
        super().__init__()
        self.n_items = n_items
        self.hidden = hidden
        self.out_dim = hidden
        self.max_len = max_len
        self.embed = InputEmbedding(n_items, hidden, llm_dim, ed_weight, learnable_offset, sparse_grad)
        self.positions = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, n_items)
        # True: the last block computes only the read-out position (a tenth of its work at L = 10).
        # Same function in exact arithmetic, but fp32 rounding and the dropout draws differ from
        # the all-positions path, so it is off unless the run asks for it (train.fast_step).
        self.readout_only = readout_only

    def encode(self, history: torch.Tensor, lengths: torch.Tensor, llm_hist: torch.Tensor | None = None,
               **ed_inputs) -> torch.Tensor:
        """history Long[B, L<=max_len], lengths Long[B] (1..L) -> Float[B, H]."""
        L = history.shape[1]
        if L > self.max_len:
            raise ValueError(f"history length {L} exceeds SASRec max_len={self.max_len}")
        valid = history < self.n_items
        x = self.embed(history, llm_hist, **ed_inputs) + self.positions.weight[:L]
        x = self.emb_dropout(x) * valid.unsqueeze(-1).to(x.dtype)
        last = (lengths.clamp(min=1) - 1).view(-1, 1)
        for i, block in enumerate(self.blocks):
            if self.readout_only and i == len(self.blocks) - 1:
                # Only the read-out position of the last block is used: its query alone, against
                # every key (same function; different rounding and dropout draws, see __init__).
                return self.final_norm(block(x, valid, last)).squeeze(1)
            x = block(x, valid)
        x = self.final_norm(x)
        return x.gather(1, last[:, :, None].expand(-1, 1, x.shape[-1])).squeeze(1)

    def forward(self, history, lengths, llm_hist=None, **ed_inputs) -> torch.Tensor:
        return self.output(self.encode(history, lengths, llm_hist, **ed_inputs))
