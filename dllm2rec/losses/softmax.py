"""Full-catalogue softmax objectives computed in item chunks (beyond the paper, issue 9).

All functions take the student state ``h`` Float[B, H] and its scoring layer (``weight``
Float[N, H], ``bias`` Float[N]) instead of dense logits, so memory stays O(B x chunk):
``catalogue_logsumexp`` is a custom autograd Function: with chunk < N it never keeps more than
one block of scores alive and recomputes them block by block in backward; with chunk >= N it
keeps the B x N softmax factors from forward (within the B x chunk budget) and skips the
recomputation. Work is done in cache-sized blocks either way (see ``BLOCK_ELEMS``).
``matmul_dtype`` (default None = fp32) runs the catalogue products in reduced precision
(``dllm2rec.precision``, ``train.matmul_dtype``); every other step of the pass stays fp32.
"""
from __future__ import annotations

import math

import torch

from dllm2rec import precision
from dllm2rec.losses import fused


class _SparseRows(torch.autograd.Function):
    """``param[ids]`` whose gradient w.r.t. ``param`` is a sparse COO tensor of the gathered rows.

    Plain indexing returns a dense gradient the size of ``param`` (O(N) per step for a catalogue
    table); this one holds only the ids' rows (duplicates are summed when the optimiser coalesces)."""

    @staticmethod
    def forward(ctx, param, ids):
        ctx.shape = param.shape
        ctx.save_for_backward(ids)
        return param[ids]

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(1, -1)
        values = g.reshape(flat.shape[1], *ctx.shape[1:])
        return torch.sparse_coo_tensor(flat, values, ctx.shape, check_invariants=False), None


class _AddRows(_SparseRows):
    """``param[ids]`` whose dense gradient is built with ``index_add_`` (``train.fast_step``; the
    forward is ``_SparseRows``'s).

    Plain indexing scatters its gradient with an accumulating ``index_put_``, which on CPU is ~8x
    slower for a few thousand rows; ``index_add_`` sums repeated ids in another order (rounding)."""

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        grad = g.new_zeros(ctx.shape)
        grad.index_add_(0, ids.reshape(-1), g.reshape(-1, *ctx.shape[1:]))
        return grad, None


def gather_rows(param: torch.Tensor, ids: torch.Tensor, sparse: bool = False, fast: bool = False) -> torch.Tensor:
    """``param[ids]``; with ``sparse`` the gradient w.r.t. ``param`` is row-sparse (``_SparseRows``),
    with ``fast`` it is dense and built by ``index_add_`` (``_AddRows``)."""
    if not param.requires_grad:
        return param[ids]
    if sparse:
        return _SparseRows.apply(param, ids)
    return _AddRows.apply(param, ids) if fast else param[ids]


def gather_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor,
                  sparse: bool = False, fast: bool = False) -> torch.Tensor:
    """Scores of selected items: h Float[B, H], ids Long[B] or Long[B, K] -> Float[B] / Float[B, K].

    ``sparse``: gradients w.r.t. ``weight`` / ``bias`` are row-sparse (``train.optimizer=lazy_adam``).
    ``fast``: dense gradients scattered by ``index_add_`` (``train.fast_step``; other rounding)."""
    w, b = gather_rows(weight, ids, sparse, fast), gather_rows(bias, ids, sparse, fast)
    if ids.dim() == 1:
        return (h * w).sum(-1) + b
    return torch.einsum("bh,bkh->bk", h, w) + b


# Scores are produced in blocks of at most this many elements (4 MiB of float32) so that the
# elementwise work stays in cache; a full B x N block for N = 17k is ~4x slower on CPU (memory
# traffic and page faults of fresh 18 MB buffers). ``chunk`` is an upper bound on the block width.
BLOCK_ELEMS = 1 << 20


def item_block(rows: int, chunk: int) -> int:
    """Items per block for ``rows`` rows: min(chunk, BLOCK_ELEMS // rows), at least 64."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return max(1, min(chunk, max(64, BLOCK_ELEMS // max(rows, 1))))


def _block_values(h, weight, bias, p, beta, excl, c0, c1, mm_dtype=None):
    """(y, a) for items c0..c1-1: y = scores, a = transformed scores with excluded ids at -inf.

    ``a`` may share storage with ``y`` (when p is None): callers must not need y after masking."""
    y = precision.addmm(bias[c0:c1], h, weight[c0:c1].t(), mm_dtype)
    a = y if p is None else y.square().mul_(p[c0:c1] / beta)
    if excl is not None:
        _exclude(a, excl, c0, c1)
    return y, a


_GROUP = 64  # items per group in ``block_topk``


def block_topk(scores: torch.Tensor, k: int, group_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest entries per row of ``scores`` Float[B, C], best first.

    Same values as ``scores.topk(k)`` (ids may differ only between tied scores), about 4x faster
    on CPU for C >> k: the k groups of 64 columns with the largest maxima hold every top-k entry
    (an entry outside them has k larger group maxima above it), so one max pass plus a top-k over
    k x 64 gathered entries replaces the top-k over all C. ``group_max`` Float[B, C // 64]: those
    maxima when the caller already has them (``fused.dro_scores``)."""
    b, c = scores.shape
    main = (c // _GROUP) * _GROUP
    if k > 64 or main < 4 * k * _GROUP:
        return scores.topk(min(k, c), dim=1)
    if group_max is None:
        group_max = scores[:, :main].reshape(b, main // _GROUP, _GROUP).amax(2)
    groups = group_max.topk(k, dim=1).indices  # [B, k]
    cols = (groups[:, :, None] * _GROUP + torch.arange(_GROUP, device=scores.device)).reshape(b, -1)
    v, j = scores.gather(1, cols).topk(k, dim=1)
    i = cols.gather(1, j)
    if main < c:  # the tail that does not fill a group
        tv, ti = scores[:, main:].topk(min(k, c - main), dim=1)
        v, j = torch.cat([v, tv], 1).topk(k, dim=1)
        i = torch.cat([i, ti + main], 1).gather(1, j)
    return v, i


def merge_topk(best_v, best_i, scores, c0: int, k: int):
    """Merge the top-k of a block of ``scores`` (items c0..) into running (values, ids) [B, <=k]."""
    v, i = block_topk(scores, k)
    i = i + c0
    if best_v is None:
        return v, i
    merged = torch.cat([best_v, v], 1)
    best_v, j = merged.topk(min(k, merged.shape[1]), dim=1)
    return best_v, torch.cat([best_i, i], 1).gather(1, j)


def _exclude(a, excl, c0: int, c1: int) -> None:
    """a[b, j - c0] = -inf for every id j of ``excl`` Long[B, E] in c0..c1-1 (in place)."""
    rows, cols = torch.nonzero((excl >= c0) & (excl < c1), as_tuple=True)
    if rows.numel():
        a[rows, excl[rows, cols] - c0] = float("-inf")


def _fused_step(rows: int, chunk: int) -> int:
    """Block width of the fused pass: ``item_block`` rounded down to a multiple of 64, so that the
    group maxima of all blocks line up and the top-k is taken once, over the whole catalogue."""
    return max(_GROUP, item_block(rows, chunk) // _GROUP * _GROUP)


def fused_blocks(rows: int, n: int, chunk: int) -> set[tuple[int, int]]:
    """The (rows, width) score blocks of a fused catalogue pass over n items (``fused.warm_up``)."""
    step = _fused_step(rows, chunk)
    return {(rows, min(step, n))} | ({(rows, n % step)} if n % step and n > step else set())


def _eager_forward(h, weight, bias, p, beta, excl, step, topk, mm_dtype, keep):
    """The catalogue forward block by block -> (lse Float[B], top ids or None, kept factors)."""
    n = weight.shape[0]
    best_v = best_i = None
    kept = []
    lse = torch.full((h.shape[0],), float("-inf"), dtype=h.dtype, device=h.device)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        y, a = _block_values(h, weight, bias, p, beta, excl, c0, c1, mm_dtype)
        if topk:  # top-k of the scores y, from the same matmul
            best_v, best_i = merge_topk(best_v, best_i, y, c0, topk)
        if keep:
            m = a.amax(1)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            e = a.sub_(m[:, None]).exp_()  # a is not needed again (y's top-k is already taken)
            lse = torch.logaddexp(lse, m + e.sum(1).log())
            if p is not None:
                e.mul_(y)  # d a / d y = 2 p y / beta: the column factor is applied in backward
            kept.append((e, m))
        else:
            lse = torch.logaddexp(lse, torch.logsumexp(a, 1))
    return lse, best_i, kept


class _CatalogueLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, p, beta, excl, chunk, topk, mm_dtype, use_fused=False):
        # chunk >= N: the caller allows B x N floats, so keep each block's unnormalised softmax
        # (times y for DRO) for backward instead of recomputing the block's scores.
        keep = chunk >= weight.shape[0]
        if use_fused and keep and p is not None:
            step = _fused_step(h.shape[0], chunk)
            lse, best_i, kept = fused.dro_forward(h, weight, bias, p, beta, excl, step, topk, mm_dtype)
        else:
            step = item_block(h.shape[0], chunk)
            lse, best_i, kept = _eager_forward(h, weight, bias, p, beta, excl, step, topk, mm_dtype, keep)
        ctx.save_for_backward(h, weight, bias, p, excl, lse)
        ctx.beta, ctx.step, ctx.kept, ctx.mm_dtype = beta, step, kept, mm_dtype
        if topk:
            ctx.mark_non_differentiable(best_i)
            return lse, best_i
        return lse

    @staticmethod
    def backward(ctx, g, *_):
        # Kept factors (chunk >= N) or recomputed blocks: memory stays O(B x chunk) in backward too.
        # With retain_graph, a second backward finds no kept factors and recomputes.
        h, weight, bias, p, excl, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = weight.shape[0]
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty_like(bias) if need_b else None
        kept, ctx.kept = ctx.kept, None
        dt = ctx.mm_dtype
        for i, c0 in enumerate(range(0, n, ctx.step)):
            c1 = min(n, c0 + ctx.step)
            if kept:
                # dy = rowf[:, None] * e * colf[None, :]; both factors are applied on the small
                # [B, H] / [C, H] side of the matmuls, so no extra pass over the B x C block.
                e, m = kept[i]
                e_mm = e if dt is None else e.to(dt)  # one cast for both products below (same values)
                rowf = g * torch.exp(m - lse)
                colf = None if p is None else p[c0:c1] * (2.0 / ctx.beta)
                if need_h:
                    wc = weight[c0:c1] if colf is None else weight[c0:c1] * colf[:, None]
                    gh.add_(precision.mm(e_mm, wc, dt) * rowf[:, None])
                if need_w and need_b and e.dtype != gw.dtype:
                    # e kept in the product dtype (fused pass): the bias gradient e.T @ rowf rides
                    # along as one more column of the weight-gradient product (one read of e)
                    both = torch.mm(e.t(), torch.cat([h * rowf[:, None], rowf[:, None]], 1).to(e.dtype))
                    gw[c0:c1].copy_(both[:, :-1])
                    gb[c0:c1].copy_(both[:, -1])
                else:
                    if need_w:
                        precision.mm_into(gw[c0:c1], e_mm.t(), h * rowf[:, None], dt)
                    if need_b:
                        torch.mv(e.float().t() if e.dtype != gb.dtype else e.t(), rowf, out=gb[c0:c1])
                if colf is not None:
                    if need_w:
                        gw[c0:c1].mul_(colf[:, None])
                    if need_b:
                        gb[c0:c1].mul_(colf)
                continue
            y, a = _block_values(h, weight, bias, p, ctx.beta, excl, c0, c1, dt)
            if p is not None:
                y = y.mul(p[c0:c1] * (2.0 / ctx.beta))  # d a / d y (a does not share y's storage here)
            dy = a.sub_(lse[:, None]).exp_().mul_(g[:, None])  # catalogue softmax x upstream grad
            if p is not None:
                dy.mul_(y)
            if need_h:
                if dt is None:
                    gh.addmm_(dy, weight[c0:c1])
                else:
                    gh.add_(precision.mm(dy, weight[c0:c1], dt))
            if need_w:
                precision.mm_into(gw[c0:c1], dy.t(), h, dt)
            if need_b:
                torch.sum(dy, 0, out=gb[c0:c1])
        return gh, gw, gb, None, None, None, None, None, None, None


def catalogue_logsumexp(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk: int = 65536,
                        p: torch.Tensor | None = None, beta: float = 1.0,
                        exclude: torch.Tensor | None = None, topk: int = 0,
                        matmul_dtype: torch.dtype | None = None, use_fused: bool = False):
    """log sum_j exp(a_j) per row, over all N items, in chunks of ``chunk`` items -> Float[B].

    a_j = y_j (scores y = h @ weight.T + bias) or, with ``p`` Float[N], a_j = p_j * y_j**2 / beta
    (the DRO transform). ``exclude`` Long[B, E]: ids left out of row b's sum (entries outside
    0..N-1 are ignored, so padding may be passed). Differentiable w.r.t. h, weight and bias.
    ``topk`` > 0 also returns Long[B, topk], the ids of the best raw scores y, best first (with
    the DRO transform the excluded ids stay in; without it they are left out), computed from the same score blocks: ``(lse, top_ids)``.
    ``matmul_dtype``: dtype of the score products (None = fp32; see ``dllm2rec.precision``).
    ``use_fused`` (``train.fast_step``): with ``p`` given and chunk >= N, the forward's elementwise
    work runs in the compiled kernels of ``dllm2rec.losses.fused`` (same function, other rounding).
    """
    item_block(1, chunk)  # validates chunk
    if topk < 0 or topk > weight.shape[0]:
        raise ValueError(f"topk must lie in 0..{weight.shape[0]}, got {topk}")
    return _CatalogueLSE.apply(h, weight, bias, p, float(beta), exclude, int(chunk), int(topk), matmul_dtype,
                               bool(use_fused))


def chunked_cross_entropy(h, weight, bias, target, chunk: int = 65536,
                          matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over rows of full softmax cross-entropy, = F.cross_entropy(h @ W.T + b, target)."""
    lse = catalogue_logsumexp(h, weight, bias, chunk, matmul_dtype=matmul_dtype)
    return (lse - gather_logits(h, weight, bias, target)).mean()


def sampled_softmax_loss(h, weight, bias, target, num_sampled: int, item_log_q: torch.Tensor,
                         generator: torch.Generator | None = None, sparse: bool = False) -> torch.Tensor:
    """Sampled softmax with k = ``num_sampled`` negatives shared by the batch, log-Q corrected.

    Negatives s_1..s_k are drawn with replacement from q = exp(item_log_q) (Float[N], normalised
    log-probabilities, e.g. log popularity). Per row:
        loss = -y_t + log( exp(y_t) + sum_i [s_i != t] exp(y_{s_i} - log(k q_{s_i})) )
    The sum is an unbiased importance-sampling estimate of sum_{j != t} exp(y_j) (accidental hits
    removed), so the loss tends to full softmax CE as k grows. Returns the mean over rows.
    ``sparse``: row-sparse gradients w.r.t. ``weight`` / ``bias`` (see ``gather_rows``).
    """
    if num_sampled <= 0:
        raise ValueError(f"num_sampled must be positive, got {num_sampled}")
    q = item_log_q.exp()
    sampled = torch.multinomial(q, num_sampled, replacement=True, generator=generator)  # [k]
    pos = gather_logits(h, weight, bias, target, sparse)  # [B]
    neg = torch.addmm(gather_rows(bias, sampled, sparse), h, gather_rows(weight, sampled, sparse).t())  # [B, k]
    neg = neg - (math.log(num_sampled) + item_log_q[sampled])
    neg = neg.masked_fill(sampled[None, :] == target[:, None], float("-inf"))
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


def soft_target_ce(h, weight, bias, target, cand, w, mix: float, chunk: int = 65536,
                   matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cross-entropy against a teacher-smoothed target distribution (softmax-student RD).

    q_b = (1 - mix) * onehot(t_b) + mix * sum_k w~_bk onehot(c_bk), w~ = w / sum_k w (rows
    renormalised so q_b sums to 1; repeated ids add up). With log-softmax l = y - lse:
        loss_b = -sum_j q_bj l_bj = lse_b - (1 - mix) y_t - mix * sum_k w~_bk y_{c_bk}
    cand Long[B, K], w Float[B, K] >= 0 (treated as constants). Returns the mean over rows.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    w = w.detach()
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    lse = catalogue_logsumexp(h, weight, bias, chunk, matmul_dtype=matmul_dtype)
    y_t = gather_logits(h, weight, bias, target)
    y_c = gather_logits(h, weight, bias, cand)
    return (lse - (1.0 - mix) * y_t - mix * (w * y_c).sum(1)).mean()

