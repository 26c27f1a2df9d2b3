"""Fused elementwise kernel of the DRO catalogue pass (``train.fast_step``), compiled by torch.compile.

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
  student's top-k, ``softmax._fused_topk``);
- ``count_greater(prod, bias, ts)`` -> Long[B]: per row, how many of y = prod + bias are strictly
  greater than ts (NaN compares false, so NaN marks the target and excluded ids): the evaluation
  rank count of ``metrics.rank_of_targets(fused=True)``, with the same values y as its eager path.

The arithmetic is the eager path's in exact arithmetic; the generated code rounds differently
(e.g. its own exp), which is why only ``train.fast_step`` uses it. NaN is the exclusion mark, so
a NaN score (a diverged model) is treated as excluded here instead of propagating; the set
members' own logits still carry it into the loss. The function is compiled once per process,
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


def warm_up(shapes, n: int, prod_dtype: torch.dtype | None = None, device=None) -> float:
    """Compile the kernels now, for the (rows, block width) ``shapes`` a run will use over a
    catalogue of ``n`` items (blocks are column slices of a [rows, n] product buffer, as in the
    catalogue pass), so that no compilation happens inside a training step. ``prod_dtype``: dtype
    of the block products (None = fp32). Returns the seconds spent."""
    import time

    t = time.perf_counter()
    with torch.no_grad():  # the catalogue pass runs inside an autograd.Function: grad mode off
        for rows, width in shapes:
            prod = torch.zeros(rows, n, device=device, dtype=prod_dtype or torch.float32)
            run("dro_block", prod[:, :width], torch.zeros(width, device=device), torch.ones(width, device=device))
            # evaluation passes both a whole (contiguous) product block and a ragged column slice
            for block in (prod[:, :width], prod[:, :width].contiguous()):
                run("count_greater", block, torch.zeros(width, device=device), torch.zeros(rows, device=device))
    return time.perf_counter() - t


def compiled(name: str) -> bool:
    """True once ``name`` runs compiled (False before first use and after a failed compile)."""
    return _RUN.get(name) not in (None, _EAGER.get(name))
