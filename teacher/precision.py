"""Mixed precision for the LoRA fine-tune: ``auto`` uses bf16 only where the hardware computes in bf16.

bf16 autocast made the CPU fine-tune 1.72x faster on a host with ``avx512_bf16`` (BENCHMARKS.md,
"Teacher: old vs new"), but on a CPU without bf16 instructions (AVX2 only) torch falls back to a
generic kernel and the same kind of bf16 product was ~5x SLOWER than fp32 (BENCHMARKS.md, issue 16
targets). The hosts this project runs on differ between sessions, so a fixed ``bf16`` default is
wrong on some of them; ``auto`` decides per machine.

Contract: ``resolve_mixed_precision(value)`` returns ``value`` unless it is ``"auto"``; for
``"auto"`` it returns ``"bf16"`` on a CUDA device that supports bf16, or on a CPU whose flags list
``avx512_bf16`` or ``amx_bf16``; otherwise ``"no"``.
"""
from __future__ import annotations

from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags listed in ``cpuinfo`` (empty when the file is missing or unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    return any(f in cpu_flags(cpuinfo) for f in BF16_CPU_FLAGS)


def resolve_mixed_precision(value: str, *, cuda: bool | None = None, cuda_bf16: bool | None = None,
                            cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``no`` | ``bf16`` for Accelerate, from the configured ``no`` | ``bf16`` | ``auto``."""
    if value != "auto":
        return value
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "no"
    return "bf16" if cpu_has_bf16(cpuinfo) else "no"
