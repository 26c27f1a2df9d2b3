"""``train.fast_step``: the DRO catalogue forward and the evaluation rank count as torch.compile kernels.

In eager mode each B x C block of catalogue scores goes through ~10 separate elementwise sweeps
(bias, square, popularity factor, maxima, subtract, exp, sum, times y), each a pass over 4 MiB
and most into a freshly allocated buffer. On a 2-core CPU that pass is bound by memory traffic,
not arithmetic, so here it is ONE function that Inductor turns into one generated loop nest which
reads the block's matrix product twice and writes only what backward needs (and one more for
evaluation, ``count_greater``):

- ``dro_block(prod, bias, pc)`` -> ``(e, group_max, m, lse)``: y = prod + bias (prod = the block's
  matrix product, fp32 or bf16, with NaN marking the row's excluded ids), a = y * y * pc (pc =
  p / beta, the DRO transform; -inf where excluded), m = row max of a (0 for an all -inf row),
  e = exp(a - m) * y (0 where excluded; the factor the catalogue backward needs, stored in the
  product's dtype since backward's products use that dtype anyway), lse = m + log(sum exp(a - m)),
  and group_max = maxima of y over groups of ``GROUP`` columns, excluded ids left out (for the
  student's top-k, ``_top_ids``);
- ``count_greater(prod, bias, ts)`` -> Long[B]: per row, how many of y = prod + bias are strictly
  greater than ts (NaN compares false, so NaN marks the target and excluded ids): the evaluation
  rank count of ``metrics.rank_of_targets(fused=True)``, with the same values y as its eager path.

The arithmetic is the eager path's in exact arithmetic; the generated code rounds differently
(e.g. its own exp), which is why only ``train.fast_step`` uses it. NaN is the exclusion mark, so
a NaN score (a diverged model) is treated as excluded here instead of propagating; the set
members' own logits still carry it into the loss. ``dro_forward`` runs the catalogue forward
around ``dro_block`` (block products, NaN marks, the top-k). Each kernel is compiled once per process,
with dynamic shapes (block widths and batch sizes vary), and Inductor keeps the generated code in
its on-disk cache, so later processes only load it. Where compiling fails (no C++ compiler, an
unsupported platform) the eager version runs, after one warning: the same function, only slower.
"""
from __future__ import annotations

import warnings

import torch

GROUP = 64  # columns per group of ``group_max`` (= softmax._GROUP)


def dro_block(prod: torch.Tensor, bias: torch.Tensor, pc: torch.Tensor):
    """prod Float/BFloat[B, C] (NaN = excluded), bias Float[C], pc Float[C] (p / beta) ->
    (e prod.dtype[B, C], group_max Float[B, C // GROUP], m Float[B], lse Float[B]); see above."""
    y = prod.float() + bias
    excluded = y != y  # NaN; Inductor vectorizes this compare but not torch.isnan (a scalar loop per vector)
    a = torch.where(excluded, float("-inf"), y * y * pc)
    m = a.amax(1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    ex = torch.exp(a - m[:, None])
    e = torch.where(excluded, torch.zeros_like(y), ex * y).to(prod.dtype)
    lse = m + torch.log(ex.sum(1))
    b, c = y.shape
    if c < GROUP:  # a last block narrower than one group (Inductor cannot lower the empty reshape)
        return e, y.new_empty(b, 0), m, lse
    main = (c // GROUP) * GROUP
    yk = torch.where(excluded, float("-inf"), y)
    return e, yk[:, :main].reshape(b, main // GROUP, GROUP).amax(2), m, lse


def count_greater(prod: torch.Tensor, bias: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """prod Float/BFloat[B, C] (NaN = not counted), bias Float[C], ts Float[B] -> Long[B]: how many
    scores prod + bias per row are strictly greater than the row's ts (evaluation ranks,
    ``metrics.rank_of_targets``); one read of the product, nothing written per score."""
    return ((prod.float() + bias) > ts[:, None]).sum(1)


def _top_ids(prod, bias, group_max, k: int, excl, ex_y):
    """Ids Long[B, k] of the k best scores y = prod + bias over the whole catalogue, best first.

    ``prod`` [B, N] holds the block products with NaN at the excluded ids, whose scores are
    ``ex_y`` Float[B, E] instead (-inf for padding and repeated ids; ids ``excl`` Long[B, E]).
    ``group_max`` Float[B, N // 64]: maxima of the non-excluded y per group of 64 columns (as in
    ``softmax.block_topk``, the k best groups hold every top-k entry that is not excluded)."""
    b, n = prod.shape
    main = (n // GROUP) * GROUP
    if k > 64 or main < 4 * k * GROUP:
        cols = torch.arange(n, device=prod.device).expand(b, n)
    else:
        groups = group_max.topk(k, dim=1).indices
        cols = (groups[:, :, None] * GROUP + torch.arange(GROUP, device=prod.device)).reshape(b, -1)
        if main < n:  # the tail that does not fill a group
            cols = torch.cat([cols, torch.arange(main, n, device=prod.device).expand(b, n - main)], 1)
    v = prod.gather(1, cols).float() + bias[cols]
    v = torch.where(torch.isnan(v), float("-inf"), v)
    ids = torch.cat([cols, excl.clamp(0, n - 1)], 1)
    j = torch.cat([v, ex_y], 1).topk(k, dim=1).indices
    return ids.gather(1, j)


def dro_forward(h, weight, bias, p, beta, excl, step, topk, mm_dtype):
    """The kept-factor DRO catalogue forward (``softmax._CatalogueLSE`` with ``train.fast_step``), its
    elementwise work in ``dro_block``. h Float[B, H], weight Float[N, H], bias / p Float[N], excl
    Long[B, E] | None, ``step`` block width (a multiple of GROUP, ``softmax._fused_step``).

    Same outputs as ``softmax._eager_forward`` (keep, p given) up to rounding:
    (lse, top ids or None, kept). All block products are written into one [B, N] buffer (in the
    product dtype) first; the excluded ids' true scores are read from it, then they are marked NaN
    in it (one gather and one scatter for the whole catalogue), so the kernel needs no index list,
    and the top-k reads the buffer plus those saved scores."""
    n, b = weight.shape[0], h.shape[0]
    pc = p / beta
    bias = bias.detach()  # as in warm_up: a requires_grad flag would make torch.compile recompile
    w = weight if mm_dtype is None else weight.to(mm_dtype)  # one cast, not one per block
    hp = h if mm_dtype is None else h.to(mm_dtype)
    prod = torch.empty(b, n, dtype=hp.dtype, device=h.device)
    for c0 in range(0, n, step):
        torch.mm(hp, w[c0:c0 + step].t(), out=prod[:, c0:c0 + step])
    ex_y = None
    if excl is not None:
        valid = (excl >= 0) & (excl < n)  # padding ids are ignored
        rows = torch.arange(b, device=h.device)[:, None].expand_as(excl)
        cols = excl.clamp(0, n - 1)
        ex_y = torch.where(valid, prod[rows, cols].float() + bias[cols], float("-inf"))
        prod[rows[valid], cols[valid]] = float("nan")
    lse = torch.full((b,), float("-inf"), dtype=h.dtype, device=h.device)
    kept, gmax = [], []
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        e, g, m, part = run("dro_block", prod[:, c0:c1], bias[c0:c1], pc[c0:c1])
        gmax.append(g)
        lse = torch.logaddexp(lse, part)
        kept.append((e, m))
    if not topk:
        return lse, None, kept
    if excl is None:
        excl, ex_y = prod.new_zeros(b, 0, dtype=torch.long), lse.new_zeros(b, 0)
    else:  # an id listed twice in a row competes once
        e_ = excl.shape[1]
        dup = ((excl[:, :, None] == excl[:, None, :]) & torch.ones(e_, e_, dtype=torch.bool, device=h.device).tril(-1)).any(-1)
        ex_y = ex_y.masked_fill(dup, float("-inf"))
    return lse, _top_ids(prod, bias, torch.cat(gmax, 1), topk, excl, ex_y), kept


_EAGER = {"dro_block": dro_block, "count_greater": count_greater}
_RUN: dict = {}  # name -> the compiled function, or the eager one after a failed compile


def run(name: str, *args):
    """Call the compiled version of ``name`` (compiled on first use; eager if compiling failed)."""
    fn = _RUN.get(name)
    if fn is None:
        fn = _RUN[name] = torch.compile(_EAGER[name], dynamic=True)
    if fn is _EAGER[name]:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to the same function, eager
        warnings.warn(f"train.fast_step: torch.compile of {name} failed ({type(exc).__name__}: {exc}); "
                      "running it uncompiled (same results, slower)", RuntimeWarning, stacklevel=2)
        _RUN[name] = _EAGER[name]
        return _EAGER[name](*args)


def warm_up(shapes, n: int, prod_dtype: torch.dtype | None = None, device=None,
            kernels=("dro_block", "count_greater")) -> float:
    """Compile ``kernels`` now, for the (rows, block width) ``shapes`` a run will use over a
    catalogue of ``n`` items (blocks are column slices of a [rows, n] product buffer, as in the
    catalogue pass), so that no compilation happens inside a training step or an evaluation.
    ``prod_dtype``: dtype of the block products (None = fp32). Returns the seconds spent."""
    import time

    t = time.perf_counter()
    with torch.no_grad():  # the catalogue pass runs inside an autograd.Function: grad mode off
        for rows, width in shapes:
            prod = torch.zeros(rows, n, device=device, dtype=prod_dtype or torch.float32)
            zeros = torch.zeros(width, device=device)
            if "dro_block" in kernels:
                run("dro_block", prod[:, :width], zeros, torch.ones(width, device=device))
            if "count_greater" in kernels:
                # evaluation passes both a whole (contiguous) product block and a ragged column slice
                for block in (prod[:, :width], prod[:, :width].contiguous()):
                    run("count_greater", block, zeros, torch.zeros(rows, device=device))
    return time.perf_counter() - t


def compiled(name: str) -> bool:
    """True once ``name`` runs compiled (False before first use and after a failed compile)."""
    return _RUN.get(name) not in (None, _EAGER.get(name))
