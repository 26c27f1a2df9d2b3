"""Fused elementwise kernels of the DRO catalogue pass (``train.fast_step``), compiled by torch.compile.

In eager mode each B x C block of catalogue scores goes through ~10 separate elementwise sweeps
(bias, square, popularity factor, maxima, subtract, exp, sum, times y), each a pass over 4 MiB
and most into a freshly allocated buffer. Here they are two functions that Inductor turns into
two generated loops:

- ``dro_scores(prod, bias, pc, y_out)`` -> ``(a, group_max)``: y = prod + bias (prod = the block's
  matrix product, fp32 or bf16) written into ``y_out`` (a slice of one [B, N] buffer, so that the
  student's top-k is taken once over the whole catalogue), a = y * y * pc (pc = p / beta, the DRO
  transform), and the maxima of y over groups of ``GROUP`` columns (for ``softmax.block_topk``);
- ``softmax_factors(a, y)`` -> ``(e, m, lse)``: m = row max of a (0 for an all -inf row),
  e = exp(a - m) * y (the factor the catalogue backward needs), lse = m + log(sum exp(a - m)).

The arithmetic is the eager path's in exact arithmetic; the generated code rounds differently
(e.g. its own exp), which is why only ``train.fast_step`` uses it. Each function is compiled once
per process, with dynamic shapes (block widths and batch sizes vary), and Inductor keeps the
generated code in its on-disk cache, so later processes only load it. Where compiling fails (no
C++ compiler, an unsupported platform) the eager versions run, after one warning: the results are
the same function, only slower.
"""
from __future__ import annotations

import warnings

import torch

GROUP = 64  # columns per group of ``group_max`` (= softmax._GROUP)


def dro_scores(prod: torch.Tensor, bias: torch.Tensor, pc: torch.Tensor, y_out: torch.Tensor):
    """Writes y = prod + bias into ``y_out`` and returns (a, group_max).

    prod Float/BFloat[B, C] (the block's matrix product), bias Float[C], pc Float[C] (p / beta),
    y_out Float[B, C] (may be a column slice of a wider buffer) -> a Float[B, C] = y * y * pc,
    group_max Float[B, C // GROUP] (maxima of y over groups of GROUP columns)."""
    y = prod.float() + bias
    y_out.copy_(y)
    b, c = y.shape
    if c < GROUP:  # a last block narrower than one group (Inductor cannot lower the empty reshape)
        return y * y * pc, y.new_empty(b, 0)
    main = (c // GROUP) * GROUP
    return y * y * pc, y[:, :main].reshape(b, main // GROUP, GROUP).amax(2)


def softmax_factors(a: torch.Tensor, y: torch.Tensor):
    """a, y Float[B, C] -> e Float[B, C] = exp(a - m) * y, m Float[B], lse Float[B] = log sum exp(a)."""
    m = a.amax(1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(a - m[:, None])
    return e * y, m, m + torch.log(e.sum(1))


_EAGER = {"dro_scores": dro_scores, "softmax_factors": softmax_factors}
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
    """Compile both kernels now, for the (rows, block width) ``shapes`` a run will use over a
    catalogue of ``n`` items (blocks are column slices of a [rows, n] buffer, as in the catalogue
    pass), so that no compilation happens inside a training step. ``prod_dtype``: dtype of the block
    products (None = fp32). Returns the seconds spent."""
    import time

    t = time.perf_counter()
    with torch.no_grad():  # the catalogue pass runs inside an autograd.Function: grad mode off
        for rows, width in shapes:
            prod = torch.zeros(rows, width, device=device, dtype=prod_dtype or torch.float32)
            y_all = torch.empty(rows, n, device=device)
            a, _ = run("dro_scores", prod, torch.zeros(width, device=device), torch.ones(width, device=device),
                       y_all[:, :width])
            run("softmax_factors", a, y_all[:, :width])
    return time.perf_counter() - t


def compiled(name: str) -> bool:
    """True once ``name`` runs compiled (False before first use and after a failed compile)."""
    return _RUN.get(name) not in (None, _EAGER.get(name))
