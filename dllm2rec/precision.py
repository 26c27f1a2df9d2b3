"""Opt-in reduced-precision matrix products for the student (``train.matmul_dtype``).

``float32`` (default, ``dtype=None`` below): every helper is the plain fp32 product, so a run is
bit-identical to one made before this option existed.

``bfloat16``: the heavy products take bf16 inputs (fp32 accumulation inside the kernel) and their
result is cast back to fp32 before anything else touches it. The products it covers:
- the ED projection (gathered teacher rows x ``Linear(d -> H)``) and its weight gradient;
- the catalogue score pass of DRO / full-softmax CE (scores h @ W.T and both backward products);
- evaluation scores (``metrics.rank_of_targets``) and the one-off projection of the teacher table.
What stays fp32: biases (added after the product), the DRO transform p * y**2 / beta, every
log-sum-exp / max / exp / sum, the losses, gathered logits of targets and candidates, the
encoder, optimizer state and weights. On CPU there is no bf16 kernel with an fp32 output
(``aten::mm.dtype`` is CUDA-only in torch 2.13), so products are rounded to bf16 (8-bit
significand, relative error <= 2**-8) before the cast back; scores lose ~2-3 significant digits.

Speed depends on the hardware: bf16 products are fast with AMX / avx512_bf16 CPUs or GPUs, and
much SLOWER than fp32 on CPUs without them (torch then uses a generic bf16 kernel). Measure with
``python -m dllm2rec bench train --compare-precision`` before using it.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

MATMUL_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def resolve(name: str) -> torch.dtype | None:
    """``train.matmul_dtype`` -> the product dtype (None = plain fp32). ValueError on other names."""
    if name not in MATMUL_DTYPES:
        raise ValueError(f"unknown matmul dtype {name!r}; choose one of {sorted(MATMUL_DTYPES)}")
    return MATMUL_DTYPES[name]


def mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b (Float[M, K] x Float[K, N] -> Float[M, N]); with ``dtype`` the inputs are cast first."""
    if dtype is None:
        return a @ b
    return torch.mm(a.to(dtype), b.to(dtype)).to(torch.float32)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``out[...] = a @ b`` (``out`` fp32, e.g. a slice of a gradient buffer); returns ``out``.

    Same values as ``out.copy_(mm(a, b, dtype))`` without the intermediate fp32 product."""
    if dtype is None:
        return torch.mm(a, b, out=out)
    return out.copy_(torch.mm(a.to(dtype), b.to(dtype)))


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """bias + a @ b; with ``dtype`` only the product is reduced, the bias is added in fp32."""
    if dtype is None:
        return torch.addmm(bias, a, b)
    # reduced product + fp32 bias promotes to fp32: float(product) + bias, the same values as
    # casting the product first, without writing and re-reading an fp32 copy of it.
    return torch.add(torch.mm(a.to(dtype), b.to(dtype)), bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           dtype: torch.dtype | None) -> torch.Tensor:
    """Differentiable ``F.linear`` with the product in ``dtype`` (autograd casts the gradients back)."""
    if dtype is None:
        return F.linear(x.to(weight.dtype), weight, bias)
    out = F.linear(x.to(dtype), weight.to(dtype)).to(torch.float32)
    return out if bias is None else out + bias
