"""Batch top-k recommendations from a trained student run folder.

``python -m dllm2rec recommend --checkpoint runs/x --input users.jsonl --top-k 20 --output recs.jsonl
[--exclude-seen] [--titles] [--scores] [--skip-unknown] [--retrieval auto|dense|flat|hnsw|ivf]``

Input rows: see ``dllm2rec.serve.histories`` (JSON lines or CSV, ids or titles). Each history keeps its
most recent ``model.max_len`` items (older ones are dropped, as in training), right-padded with
the padding id N like the dataset rows. The model runs in eval mode (dropout off) whatever the
training protocol was, so recommendations are deterministic.

ED students: the teacher item table is projected ONCE at load time to ``ed_table`` Float[N+1, H]
(``project_llm_table``; row N = zeros for padding) and fed as ``llm_hist_projected``, so the wide
LLM table is used only while loading (and not at all from an exported artefact, see export.py).

Output: one JSON object per input row, in input order, written atomically (temp + rename):
``{"id", "line", "items": [ids best first], "titles"?: [...], "scores"?: [...],
"unknown"?: [items dropped with --skip-unknown]}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dllm2rec.serve.export import OLD_SCHEMAS, SCHEMA, load_exported
from dllm2rec.serve.histories import FORMATS, ITEM_KINDS, ItemTable, Request, read_histories
from dllm2rec.serve.retrieval import METHODS, build_retriever
from dllm2rec.serve.student import load_student

def pad_histories(histories: list[list[int]], max_len: int, padding_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the most recent ``max_len`` items of each history and right-pad with ``padding_id``.

    Returns history Long[B, max_len] and lengths Long[B] (1..max_len)."""
    out = torch.full((len(histories), max_len), padding_id, dtype=torch.long)
    lengths = torch.zeros(len(histories), dtype=torch.long)
    for r, h in enumerate(histories):
        recent = h[-max_len:]
        out[r, : len(recent)] = torch.tensor(recent, dtype=torch.long)
        lengths[r] = len(recent)
    return out, lengths


def exclusion_matrix(histories: list[list[int]], padding_id: int) -> torch.Tensor:
    """All given items of each row (not only the most recent max_len): Long[B, max len], padded."""
    width = max(len(h) for h in histories)
    out = torch.full((len(histories), width), padding_id, dtype=torch.long)
    for r, h in enumerate(histories):
        out[r, : len(h)] = torch.tensor(h, dtype=torch.long)
    return out


def open_checkpoint(path: str | Path, dataset=None, teacher=None):
    """A run folder (``load_student``) or an export folder (``export.load_exported``)."""
    manifest = Path(path) / "manifest.json"
    schema = None
    if manifest.is_file():
        try:
            schema = json.loads(manifest.read_text(encoding="utf-8")).get("schema")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            schema = None  # not an export manifest; the run-folder loader reports problems
    if schema == SCHEMA or schema in OLD_SCHEMAS:  # an old export gets load_exported's re-export message
        return load_exported(path)
    return load_student(path, dataset, teacher)


@torch.no_grad()
def recommend(student, histories: list[list[int]], k: int, exclude_seen: bool = False,
              retrieval: str = "auto", batch_size: int = 1024, retriever=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k for each history (ids oldest first) -> (scores Float[R, k], ids Long[R, k]).

    ``student``: a ``Student`` or an ``export.ExportedStudent`` (same attributes).

    ids are best first; -1 (score -inf) marks a slot left empty because fewer than k items remain.
    """
    if k <= 0:
        raise ValueError(f"top-k must be positive, got {k}")
    retriever = retriever or build_retriever(student.output_weight, student.output_bias, method=retrieval)
    all_s, all_i = [], []
    for s in range(0, len(histories), batch_size):
        chunk = histories[s:s + batch_size]
        hist, lengths = pad_histories(chunk, student.max_len, student.padding_id)
        h = student.encode(hist, lengths)
        excl = exclusion_matrix(chunk, student.padding_id) if exclude_seen else None
        sc, ids = retriever.search(h, k, excl)
        all_s.append(sc)
        all_i.append(ids)
    return torch.cat(all_s), torch.cat(all_i)


def format_rows(requests: list[Request], scores: torch.Tensor, ids: torch.Tensor, titles: list[str] | None,
                with_scores: bool) -> list[str]:
    lines = []
    for r, req in enumerate(requests):
        keep = ids[r] >= 0
        items = ids[r][keep].tolist()
        row = {"id": req.rid, "line": req.line, "items": items}
        if titles is not None:
            row["titles"] = [titles[i] for i in items]
        if with_scores:
            row["scores"] = [round(float(x), 6) for x in scores[r][keep]]
        if req.unknown:
            row["unknown"] = req.unknown
        lines.append(json.dumps(row, ensure_ascii=False))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="student run folder (config.yaml, best/model.safetensors) or an export folder")
    parser.add_argument("--input", required=True, help="histories: JSON lines {'history': [...], 'id': ...} or CSV")
    parser.add_argument("--output", required=True, help="JSON lines output (written atomically)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--exclude-seen", action="store_true", help="never recommend an item of the history")
    parser.add_argument("--titles", action="store_true", help="add item titles to each output row")
    parser.add_argument("--scores", action="store_true", help="add the model scores to each output row")
    parser.add_argument("--skip-unknown", action="store_true",
                        help="drop unknown items (reported per row and on stderr) instead of failing")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: by extension)")
    parser.add_argument("--items", default="auto", choices=ITEM_KINDS, help="how to read history items")
    parser.add_argument("--retrieval", default="auto", choices=METHODS,
                        help="top-k backend: dense matmul, exact FAISS (flat), approximate hnsw/ivf; "
                             "auto = exact, FAISS flat for batches under 20 rows at 100k+ items, else dense")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dataset", default=None, help="dataset folder (default: the one in config.yaml)")
    parser.add_argument("--teacher", default=None, help="teacher folder for ED students (default: config.yaml)")


def run(args: argparse.Namespace) -> int:
    from dllm2rec.atomic import atomic_write_text
    from dllm2rec.errors import ConfigError

    if args.top_k <= 0 or args.batch_size <= 0:
        raise ConfigError("--top-k and --batch-size must be positive")
    student = open_checkpoint(args.checkpoint, args.dataset, args.teacher)
    table = ItemTable(student.titles)
    requests = read_histories(args.input, table, args.format, args.items, args.skip_unknown)
    usable = [q for q in requests if q.items]
    empty = [q for q in requests if not q.items]
    scores, ids = recommend(student, [q.items for q in usable], args.top_k, args.exclude_seen,
                            args.retrieval, args.batch_size) if usable else (None, None)
    rows = dict(zip((q.line for q in usable), format_rows(usable, scores, ids, student.titles if args.titles else None,
                                                         args.scores))) if usable else {}
    for q in empty:  # every item was unknown (only possible with --skip-unknown): say so in the row
        rows[q.line] = json.dumps({"id": q.rid, "line": q.line, "items": [], "unknown": q.unknown,
                                   "error": "no known items in the history"}, ensure_ascii=False)
    atomic_write_text(args.output, "".join(rows[q.line] + "\n" for q in requests))
    n_unknown = sum(len(q.unknown) for q in requests)
    if n_unknown:
        first = next(q for q in requests if q.unknown)
        print(f"warning: {args.input}: skipped {n_unknown} unknown item(s) in "
              f"{sum(1 for q in requests if q.unknown)} row(s) (first: line {first.line}: {first.unknown[0]!r}); "
              f"{len(empty)} row(s) had no known item left", file=sys.stderr)
    print(f"wrote {len(requests)} rows of top-{args.top_k} to {args.output}", file=sys.stderr)
    return 0
