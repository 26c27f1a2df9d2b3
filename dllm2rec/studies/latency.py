"""Student vs teacher inference cost: ``python -m dllm2rec analyze latency --run RUN
(--teacher-bench FILE | --teacher-seconds-per-row X) [--split test] [--repeats 5] [--batch-size 1024]``.

Student: wall time to rank every row of the split against ALL items (encode + chunked top-k,
batches of ``--batch-size``, eval mode), median of ``--repeats`` timed passes after one warm-up.
Teacher: seconds per row on this machine, either given, or read from the markdown table that
``python -m teacher bench`` writes (rows ``| measurement | engine | rows | median s | ...``):
per-row cost = generation (``greedy``, or ``beamN`` with ``--teacher-decoding beam``) + embedding
of the generated text (the ``embed`` measurement, item titles of similar length) + grounding
(``ground``), each at its fastest engine. A JSON file with ``seconds_per_row`` works too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from dllm2rec.errors import ConfigError, DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="student run folder (or export folder)")
    parser.add_argument("--teacher-bench", default=None, help="teacher bench output (markdown table or JSON)")
    parser.add_argument("--teacher-seconds-per-row", type=float, default=None)
    parser.add_argument("--teacher-decoding", default="greedy", choices=["greedy", "beam"])
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--dataset", default=None, help="dataset folder (default: the run's config.yaml)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="folder for latency.json / latency.md")


def teacher_seconds_per_row(path: str | Path, decoding: str = "greedy") -> tuple[float, dict]:
    """(seconds per row, {part: seconds per row}) from a teacher bench file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "teacher bench file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            value = float(json.loads(text)["seconds_per_row"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(p, f"expected a JSON object with a numeric 'seconds_per_row' ({exc})") from exc
        return value, {"given": value}
    best: dict[str, float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 4 or not cells[2].isdigit():
            continue
        what, rows = cells[0], int(cells[2])
        try:
            secs = float(cells[3])
        except ValueError as exc:
            raise DataError(p, f"median seconds {cells[3]!r} is not a number", row=n) from exc
        if rows > 0:
            best[what] = min(best.get(what, float("inf")), secs / rows)
    gen = "greedy" if decoding == "greedy" else next((w for w in best if w.startswith("beam")), "beam")
    missing = [w for w in (gen, "embed", "ground") if w not in best]
    if missing:
        raise DataError(p, f"no {', '.join(missing)} measurement(s) in the bench table (found {sorted(best) or 'none'}); "
                           "run `python -m teacher bench` without --only, or pass --teacher-seconds-per-row")
    parts = {gen: best[gen], "embed": best["embed"], "ground": best["ground"]}
    return sum(parts.values()), parts


def student_ranking_seconds(run: str, split: str = "test", k: int = 20, batch_size: int = 1024,
                            repeats: int = 5, dataset: str | None = None) -> dict:
    """Median wall seconds for the student to produce top-k over all items for every split row."""
    import torch

    from dllm2rec.studies.rankings import dataset_path, student_topk
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.serve.student import load_student

    student = load_student(run, dataset)
    ds = load_dataset(dataset_path(student, dataset))
    rows = len(ds.splits[split]["target"])
    student_topk(student, ds, split, k, batch_size)  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        student_topk(student, ds, split, k, batch_size)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"run": str(run), "split": split, "rows": rows, "n_items": ds.n_items, "k": k, "batch_size": batch_size,
            "repeats": repeats, "seconds": med, "seconds_per_row": med / max(rows, 1), "all_seconds": times,
            "threads": torch.get_num_threads()}


def latency_table(student: dict, teacher_spr: float, parts: dict) -> str:
    rows = student["rows"]
    ratio = teacher_spr / student["seconds_per_row"] if student["seconds_per_row"] else float("inf")
    return "\n".join([
        f"# Inference cost on {rows} {student['split']} rows ({student['n_items']} items, top-{student['k']})", "",
        "| model | seconds per row | seconds for the split |", "|---|---|---|",
        f"| teacher (LLM: {' + '.join(parts)}) | {teacher_spr:.3g} | {teacher_spr * rows:.4g} |",
        f"| student ({student['run']}) | {student['seconds_per_row']:.3g} | {student['seconds']:.4g} |", "",
        f"Teacher / student time ratio: {ratio:.3g}x (student: median of {student['repeats']} full-ranking passes, "
        f"batch {student['batch_size']}, {student['threads']} threads).", ""])


def run(args: argparse.Namespace) -> int:
    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    if (args.teacher_bench is None) == (args.teacher_seconds_per_row is None):
        raise ConfigError("give exactly one of --teacher-bench FILE or --teacher-seconds-per-row X")
    if args.repeats < 1 or args.batch_size < 1 or args.k < 1:
        raise ConfigError("--repeats, --batch-size and --k must be positive")
    if args.teacher_bench:
        spr, parts = teacher_seconds_per_row(args.teacher_bench, args.teacher_decoding)
    else:
        if args.teacher_seconds_per_row <= 0:
            raise ConfigError("--teacher-seconds-per-row must be positive")
        spr, parts = args.teacher_seconds_per_row, {"given": args.teacher_seconds_per_row}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    student = student_ranking_seconds(args.run, args.split, args.k, args.batch_size, args.repeats, args.dataset)
    table = latency_table(student, spr, parts)
    print(table)
    if args.out:
        atomic_write_json(Path(args.out) / "latency.json", {
            "student": student, "teacher_seconds_per_row": spr, "teacher_parts": parts,
            "teacher_source": args.teacher_bench or "--teacher-seconds-per-row",
            "ratio": spr / student["seconds_per_row"] if student["seconds_per_row"] else None})
        atomic_write_text(Path(args.out) / "latency.md", table)
    return 0
