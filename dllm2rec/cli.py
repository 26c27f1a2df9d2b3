"""``python -m dllm2rec <command>``: one entry point; each command lives in its own module.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``--help`` stays fast and the student side never
imports the LLM stack.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dllm2rec.errors import Dllm2RecError

# command -> (module, one-line help). Order is the order a new user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("dllm2rec.data.cli", "prepare / import / export datasets (MovieLens, Amazon, reference format)"),
    "train": ("dllm2rec.train.loop", "train one student (optionally with DLLM2Rec distillation)"),
    "evaluate": ("dllm2rec.eval.evaluate", "evaluate a trained student on valid/test (full ranking)"),
    "experiment": ("dllm2rec.studies.experiment", "run a grid of student runs and write one results table"),
    "tune": ("dllm2rec.studies.tune", "pick distillation strength on validation (Optuna; 0 included)"),
    "analyze": ("dllm2rec.studies.analyze", "teacher/student overlap diagnostics and plots"),
    "recommend": ("dllm2rec.serve.recommend", "batch top-k recommendations from a trained student"),
    "export": ("dllm2rec.serve.export", "export a trained student as a self-contained artefact"),
    "bench": ("dllm2rec.bench.cli", "benchmarks: training speed, serving latency, scaling"),
    "recbole": ("dllm2rec.compare.recbole", "export the split to RecBole and compare against it"),
    "demo": ("dllm2rec.demo", "the whole pipeline on MovieLens-100K with SmolLM2, cached per stage"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dllm2rec",
        description="Distil an LLM recommender into sequential students (DLLM2Rec). "
        "Run 'python -m dllm2rec <command> --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(load=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except Dllm2RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
