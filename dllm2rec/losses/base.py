"""Base student losses (SPEC section 4): negative sampling, BCE, DRO. Pure functions of tensors.

Scores are never materialised as a dense [B, N] matrix here: functions take the student state
``h`` Float[B, H] and the scoring layer (``weight`` Float[N, H], ``bias`` Float[N]) and work in
item chunks (see dllm2rec/losses/softmax.py).
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from dllm2rec.losses.softmax import catalogue_logsumexp, gather_logits

__all__ = ["sample_negatives", "bce_loss", "item_popularity_weights", "dro_loss", "gather_logits"]

_MAX_ROUNDS = 64


def sample_negatives(history: torch.Tensor, target: torch.Tensor, n_items: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One negative per row, uniform over items in neither the row's history nor its target.

    history Long[B, L] (padding id N is ignored), target Long[B] -> Long[B]. Vectorised rejection
    sampling: draw uniform ids, redraw the rows that hit a forbidden id; rows still rejected after
    64 rounds (only when nearly every item is forbidden) are drawn exactly from their allowed set.
    Raises ValueError when a row has no allowed item.
    """
    b = target.shape[0]
    forbidden = torch.cat([history, target[:, None]], 1)
    out = torch.randint(0, n_items, (b,), generator=generator, device=target.device)
    todo = (forbidden == out[:, None]).any(1)
    for _ in range(_MAX_ROUNDS):
        if not todo.any():
            return out
        rows = todo.nonzero().squeeze(1)
        draw = torch.randint(0, n_items, (rows.numel(),), generator=generator, device=target.device)
        out[rows] = draw
        todo[rows] = (forbidden[rows] == draw[:, None]).any(1)
    rows = todo.nonzero().squeeze(1)
    allowed = torch.ones(rows.numel(), n_items + 1, device=target.device)
    allowed.scatter_(1, forbidden[rows].clamp(0, n_items), 0.0)
    allowed = allowed[:, :n_items]
    empty = allowed.sum(1) == 0
    if empty.any():
        raise ValueError(f"row {int(rows[empty][0])}: every one of the {n_items} items is in the history or "
                         "is the target; no negative can be drawn")
    out[rows] = torch.multinomial(allowed, 1, generator=generator).squeeze(1)
    return out


def bce_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the 2B logits (positives label 1, negatives label 0)."""
    # softplus(-x) = -log sigmoid(x), softplus(x) = -log(1 - sigmoid(x)): same as BCEWithLogitsLoss
    return (F.softplus(-pos_logits).sum() + F.softplus(neg_logits).sum()) / (pos_logits.numel() + neg_logits.numel())


def item_popularity_weights(train_targets: torch.Tensor, n_items: int) -> torch.Tensor:
    """p_j = ((count_j + 1) / sum_k (count_k + 1)) ** 0.05, count_j = times j is a train target.

    train_targets Long[R] with ids in 0..N-1 -> Float32[N] (computed in float64)."""
    t = torch.as_tensor(train_targets).long().reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_items):
        bad = int(((t < 0) | (t >= n_items)).nonzero()[0])
        raise ValueError(f"train target at row {bad} is {int(t[bad])}, outside 0..{n_items - 1}")
    counts = torch.bincount(t, minlength=n_items).double() + 1.0
    return (counts / counts.sum()).pow(0.05).float()


def dro_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
             p: torch.Tensor, beta: float = 1.0, chunk: int = 65536, topk: int = 0,
             matmul_dtype: torch.dtype | None = None, y: torch.Tensor | None = None, use_fused: bool = False):
    """DRO term per row (and per target column), SPEC section 4:

        log( sum_j exp(p_j y_j^2 / beta) - exp(p_t y_t^2 / beta) + exp(p_t (y_t - 1)^2 / beta) + 1e-24 )

    target Long[B] -> Float[B], or Long[B, T] -> Float[B, T] (column t uses target[:, t] as the
    positive; one catalogue pass serves all columns, e.g. the target plus the K RD candidates).
    The caller takes ``alpha * dro.mean()``.

    Computed without cancellation: the catalogue sum runs with the row's T ids masked out (a
    masked log-sum-exp in chunks), and the other set members are added back in log space, so
    "sum minus the target's term" is never formed by subtraction. Memory O(B x chunk).

    ``topk`` > 0 returns ``(dro, top_ids)`` with top_ids Long[B, topk] the student's best items
    from the same score pass (feed ``distill.membership(cand, top_ids)`` for RD consistency and
    skip a second catalogue pass).

    ``matmul_dtype`` (None = fp32): dtype of the catalogue score products only (``dllm2rec.precision``);
    the set members' logits, the transform and the log-space sums stay fp32.

    ``y`` Float[B, T]: the set members' logits when the caller already gathered them (same values
    as ``gather_logits(h, weight, bias, target)``); saves a gather whose backward is a dense [N, H].
    ``use_fused``: compiled elementwise kernels for the catalogue pass (``catalogue_logsumexp``).
    """
    squeeze = target.dim() == 1
    ids = target[:, None] if squeeze else target
    if y is None:
        y = gather_logits(h, weight, bias, ids)  # [B, T]
    elif y.shape != ids.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}, the target ids {tuple(ids.shape)}")
    pt = p[ids]
    a_set = pt * y * y / beta
    b_set = pt * (y - 1.0) * (y - 1.0) / beta
    lse_rest = catalogue_logsumexp(h, weight, bias, chunk, p=p, beta=beta, exclude=ids, topk=topk,
                                   matmul_dtype=matmul_dtype, use_fused=use_fused)  # [B]
    top = None
    if topk:
        lse_rest, top = lse_rest
    b, t = ids.shape
    same = ids[:, :, None] == ids[:, None, :]  # [B, T, T]
    earlier = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril(-1)
    first = ~(same & earlier).any(-1)  # first occurrence of each id in its row
    # others[b, t, s]: a_s for the distinct set ids other than column t's id
    keep = first[:, None, :] & ~same
    others = a_set[:, None, :].expand(b, t, t).masked_fill(~keep, float("-inf"))
    terms = torch.cat([
        lse_rest[:, None, None].expand(b, t, 1),
        others,
        b_set[:, :, None],
        torch.full((b, t, 1), math.log(1e-24), dtype=y.dtype, device=y.device),
    ], 2)
    out = torch.logsumexp(terms, 2)
    out = out[:, 0] if squeeze else out
    return (out, top) if topk else out
