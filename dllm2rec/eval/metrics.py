"""Full-ranking evaluation (SPEC section 5): ranks of targets, HR@K / NDCG@K, top-k items.

Scores are computed in blocks of rows x chunks of items, so memory stays bounded for any N.
Tie handling: rank = 1 + #items with a STRICTLY greater score (ties with the target count in
its favour). The target's own score is computed once per row by a dot product and compared
against the matmul scores of every other item; the target column itself is never counted.
A degenerate model with all-equal scores would therefore rank every target first: callers
that can produce constant scores should check, e.g., ``topk_items`` for diversity.
Optional ``exclude`` (non-default protocol): ids per row (e.g. the history, padding ignored)
removed from the ranking; the target itself is never removed.
Optional ``matmul_dtype`` (``train.matmul_dtype``, see ``dllm2rec.precision``): scores from
reduced-precision products. Opt-in and not exact: the target's score is then rounded the same
way as every other score, but bf16 rounding creates ties, and ties count in the target's favour,
so bf16 ranks lean optimistic (``bench train --compare-precision`` measures the agreement).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dllm2rec import precision
from dllm2rec.losses import fused
from dllm2rec.losses.softmax import item_block, merge_topk

_ROW_BLOCK = 1024  # rows per block; items per block from softmax.item_block (cache-sized)
_TOPK_ROW_BLOCK = 128  # fewer rows -> wider item blocks, where softmax.block_topk pays off


def _exclusion_mask(exclude: torch.Tensor | None, c0: int, c1: int):
    if exclude is None:
        return None
    rows, cols = torch.nonzero((exclude >= c0) & (exclude < c1), as_tuple=True)
    return rows, exclude[rows, cols] - c0


def _fused_count(hb, weight, bias, tb, ts, eb, step: int, matmul_dtype) -> torch.Tensor:
    """#items scoring strictly above ts per row (target and ``eb`` ids left out), via the compiled
    ``fused.count_greater`` on each block's product -> Long[B]."""
    n = weight.shape[0]
    hp = hb if matmul_dtype is None else hb.to(matmul_dtype)
    w = weight if matmul_dtype is None else weight.to(matmul_dtype)
    rows_all = torch.arange(hb.shape[0], device=hb.device)
    greater = torch.zeros(hb.shape[0], dtype=torch.long, device=hb.device)
    prod = torch.empty(hb.shape[0], step, dtype=hp.dtype, device=hb.device)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        block = torch.mm(hp, w[c0:c1].t(), out=prod[:, :c1 - c0])
        inside = (tb >= c0) & (tb < c1)
        block[rows_all[inside], tb[inside] - c0] = float("nan")  # the target never counts against itself
        m = _exclusion_mask(eb, c0, c1)
        if m is not None and m[0].numel():
            block[m[0], m[1]] = float("nan")
        greater += fused.run("count_greater", block, bias[c0:c1], ts)
    return greater


@torch.no_grad()
def rank_of_targets(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                    chunk: int = 65536, exclude: torch.Tensor | None = None,
                    matmul_dtype: torch.dtype | None = None, fused: bool = False) -> torch.Tensor:
    """1-based rank of each row's target among all N items -> Long[B].

    h Float[B, H], weight Float[N, H], bias Float[N], target Long[B], exclude Long[B, E] | None,
    matmul_dtype None (fp32, exact) or a reduced dtype (see the module docstring).
    ``fused`` (``train.fast_step``): each block's product goes straight into the compiled
    ``losses.fused.count_greater`` (target and excluded ids marked NaN in it) instead of being
    biased, compared and summed in fp32 passes. Same ranks with a reduced ``matmul_dtype`` (the
    scores are the same values); with fp32 products the bias is added after the product instead
    of inside it, which can move near-ties.
    """
    n = weight.shape[0]
    out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
    for r0 in range(0, h.shape[0], _ROW_BLOCK):
        hb, tb = h[r0:r0 + _ROW_BLOCK], target[r0:r0 + _ROW_BLOCK]
        eb = None if exclude is None else exclude[r0:r0 + _ROW_BLOCK]
        if eb is not None:  # never exclude the target itself
            eb = eb.masked_fill(eb == tb[:, None], -1)
        if matmul_dtype is None:
            ts = (hb * weight[tb]).sum(1) + bias[tb]
        else:  # products of dtype values are exact in fp32; round the sum as the matmul rounds its output
            ts = (hb.to(matmul_dtype).float() * weight[tb].to(matmul_dtype).float()).sum(1)
            ts = ts.to(matmul_dtype).float() + bias[tb]
        step = item_block(hb.shape[0], chunk)
        if fused:
            out[r0:r0 + _ROW_BLOCK] = _fused_count(hb, weight, bias, tb, ts, eb, step, matmul_dtype) + 1
            continue
        greater = torch.zeros(hb.shape[0], dtype=torch.long, device=h.device)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            s = precision.addmm(bias[c0:c1], hb, weight[c0:c1].t(), matmul_dtype)
            inside = (tb >= c0) & (tb < c1)
            if inside.any():  # the target never counts against itself
                rows = inside.nonzero().squeeze(1)
                s[rows, tb[rows] - c0] = float("-inf")
            m = _exclusion_mask(eb, c0, c1)
            if m is not None and m[0].numel():
                s[m[0], m[1]] = float("-inf")
            # In place, s becomes 1.0 where an item scores strictly higher than the target, else 0.0
            # (NaN compares false, as with ``>``). A float row sum of at most item_block(...) <= 2**20
            # ones is exact, and about 5x faster on CPU than ``(s > ts).sum(1)`` over a bool tensor.
            greater += s.gt_(ts[:, None]).sum(1).long()
        out[r0:r0 + _ROW_BLOCK] = greater + 1
    return out


def hr_ndcg(ranks: torch.Tensor, ks=(1, 5, 10, 20, 50), reduce: str = "mean") -> dict[str, float]:
    """{"hr@K": ..., "ndcg@K": ...} from 1-based ranks Long[R].

    HR@K = [rank <= K]; NDCG@K = [rank <= K] / log2(rank + 1) (one relevant item per row).
    ``reduce="sum"`` returns sums (to aggregate over processes: divide by the total row count).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    r = ranks.double()
    gain = 1.0 / torch.log2(r + 1.0)
    out: dict[str, float] = {}
    count = max(r.numel(), 1) if reduce == "mean" else 1
    for k in ks:
        hit = r <= k
        out[f"hr@{k}"] = float(hit.sum()) / count
        out[f"ndcg@{k}"] = float((gain * hit).sum()) / count
    return out


def metrics_from_ranks(ranks, ks=(1, 5, 10, 20, 50)) -> dict[str, float]:
    """``hr_ndcg`` of 1-based ranks given as any int array [R]; NaN for every metric when R == 0."""
    r = torch.as_tensor(np.asarray(ranks, dtype=np.int64))
    if r.numel() == 0:
        return {f"{m}@{k}": math.nan for k in ks for m in ("hr", "ndcg")}
    return hr_ndcg(r, list(ks))


@torch.no_grad()
def topk_items(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, chunk: int = 65536,
               exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Ids of the k best-scored items per row, best first -> Long[B, k] (merged per-chunk top-k)."""
    n = weight.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must lie in 1..{n}, got {k}")
    out = torch.empty(h.shape[0], k, dtype=torch.long, device=h.device)
    rb = _TOPK_ROW_BLOCK
    for r0 in range(0, h.shape[0], rb):
        hb = h[r0:r0 + rb]
        eb = None if exclude is None else exclude[r0:r0 + rb]
        best_v = best_i = None
        step = item_block(hb.shape[0], chunk)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            s = torch.addmm(bias[c0:c1], hb, weight[c0:c1].t())
            m = _exclusion_mask(eb, c0, c1)
            if m is not None and m[0].numel():
                s[m[0], m[1]] = float("-inf")
            best_v, best_i = merge_topk(best_v, best_i, s, c0, k)
        out[r0:r0 + rb] = best_i
    return out


def ndcg_gain(rank: int) -> float:
    """1 / log2(rank + 1): the gain of a hit at 1-based ``rank``."""
    return 1.0 / math.log2(rank + 1)
