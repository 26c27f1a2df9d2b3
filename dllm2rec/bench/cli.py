"""``python -m dllm2rec bench <which>``: benchmarks, one module per benchmark.

| which | module | measures |
|---|---|---|
| train | dllm2rec.bench.train | one training epoch + full evaluation at Amazon-Games size |
| eval  | dllm2rec.bench.train | full-ranking evaluation only |
| scale | dllm2rec.bench.scale | step time / peak memory vs catalogue size, 1 vs 2 processes, DDP vs ZeRO-2 |
| serve | dllm2rec.bench.serve | serving throughput / latency |
| pipeline | dllm2rec.bench.pipeline | generate -> prepare -> teacher -> train -> evaluate at 1M+ interactions: seconds, peak RSS |

To add a benchmark: write a module with ``add_arguments(parser)`` and ``run(args) -> int`` and add
one line to ``BENCHMARKS``. Benchmark modules must import heavy dependencies inside functions.
"""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "train": ("dllm2rec.bench.train", "one training epoch + full evaluation, Games-sized synthetic input"),
    "eval": ("dllm2rec.bench.train", "full-ranking evaluation of 14,980 rows over 17,408 items"),
    "scale": ("dllm2rec.bench.scale", "step time and peak memory for 20k/200k/2M items, 1 vs 2 processes, DDP vs ZeRO-2"),
    "serve": ("dllm2rec.bench.serve", "serving throughput and latency (students vs the LLM teacher)"),
    "pipeline": ("dllm2rec.bench.pipeline", "whole pipeline on a synthetic skewed log: seconds and peak RSS per stage"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="<benchmark>", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:  # benchmark modules import their heavy dependencies inside functions
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            p.set_defaults(_missing=f"{module}: {exc}")
            continue
        mod.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_missing", None):
        raise SystemExit(f"error: benchmark {args.bench!r} is not available ({args._missing})")
    module = importlib.import_module(BENCHMARKS[args.bench][0])
    return int(module.run(args) or 0)
