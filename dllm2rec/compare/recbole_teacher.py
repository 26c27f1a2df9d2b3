"""A RecBole run as a distillation teacher: checks and the import behind ``recbole --teacher-out``.

``python -m dllm2rec recbole ... --teacher-top-n N`` makes ``recbole_runner.py`` write, into the
run folder, ``teacher_rankings.jsonl`` (the ``python -m teacher import`` format, score kind
``logit``, plus the exact ``target_rank``) and ``item_embeddings.npy`` [N, d] in our item order.
With ``--teacher-out T`` the command then imports them itself, exactly as

    python -m teacher import --rankings RUN/teacher_rankings.jsonl --score-kind logit \\
        --dataset D --out T --item-embeddings RUN/item_embeddings.npy

would (``teacher.importer.import_rankings``: every check of a user's rankings file applies),
recording the RecBole model, seed and run folder in the manifest's ``source``.
"""
from __future__ import annotations

from pathlib import Path

from dllm2rec.errors import ConfigError, DataError

RANKINGS = "teacher_rankings.jsonl"
EMBEDDINGS = "item_embeddings.npy"
MIN_TOP_N = 10  # teacher import's default --min-top-n (>= distill.rd.k's default 10)


def check_teacher_args(top_n: int | None, teacher_out: str | None, n_runs: int, n_items: int) -> int | None:
    """The teacher top-n to ask the runner for (None = no teacher); ConfigError on bad options.

    ``--teacher-out`` without ``--teacher-top-n`` means top-50 (``teacher from-run``'s default);
    it needs exactly one (model, seed) run, since one folder holds one teacher.
    """
    if teacher_out is not None and top_n is None:
        top_n = min(50, n_items)
    if top_n is None:
        return None
    if not MIN_TOP_N <= top_n <= n_items:
        raise ConfigError(f"--teacher-top-n {top_n} must be in {MIN_TOP_N}..{n_items} "
                          f"(teacher import needs >= {MIN_TOP_N} items per row; the dataset has {n_items})")
    if teacher_out is not None and n_runs != 1:
        raise ConfigError(f"--teacher-out writes one teacher folder but {n_runs} (model, seed) runs were "
                          f"asked for; give one --models and one --seeds value")
    return top_n


def teacher_ready(raw: dict, run_dir: Path, top_n: int | None) -> bool:
    """Whether a finished run's folder already holds the teacher files for ``top_n`` (None: not needed)."""
    if top_n is None:
        return True
    info = raw.get("teacher") or {}
    return info.get("top_n") == top_n and (run_dir / RANKINGS).is_file() and (run_dir / EMBEDDINGS).is_file()


def check_teacher_rows(raw: dict, run_dir: Path, counts: dict) -> None:
    """The runner scored every row of every split (DataError naming runner.json otherwise)."""
    rows = (raw.get("teacher") or {}).get("rows")
    if rows != {s: counts[s] for s in ("train", "valid", "test")}:
        raise DataError(run_dir / "runner.json", f"the RecBole teacher scored rows {rows}, the dataset has {counts}")


def import_teacher(run_dir: str | Path, dataset: str | Path, out: str | Path, model: str, seed: int) -> dict:
    """Import a run folder's teacher files as the teacher folder ``out`` -> its manifest."""
    from teacher.importer import import_rankings

    run_dir = Path(run_dir)
    source = {"recbole_model": model, "seed": seed, "run": str(run_dir)}
    return import_rankings(run_dir / RANKINGS, "logit", dataset, out, run_dir / EMBEDDINGS,
                           min_top_n=MIN_TOP_N, source=source)
