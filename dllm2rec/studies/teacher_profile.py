"""What kind of recommender is the teacher? (``python -m dllm2rec analyze teacher``)

A distilled student can only learn what its teacher knows. This profile puts the teacher's
ranking next to the two cheapest references on the same rows:

- ``popularity``: the items most often a training target, the same list for every row;
- ``random``: the expected hit rate of a uniformly random ranking, ``k / n_items``.

and describes how varied the teacher's output is: how many distinct texts it generated, the
share that is exactly a catalogue title, how many distinct top-1 items and top-k lists it
produced, and how many catalogue items appear in any top-k list (coverage). A teacher whose
lists hardly change from user to user is close to a popularity ranking, whatever its size.

``profile_teacher(teacher_dir, dataset_dir, split, k)`` returns a JSON-ready dict;
``profile_markdown(profile)`` renders it.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np



def popularity_ranking(train_targets: np.ndarray, n_items: int) -> np.ndarray:
    """Item ids by descending count as a training target (ties: lower id first): Long[n_items]."""
    counts = np.bincount(np.asarray(train_targets, np.int64), minlength=n_items)
    return np.lexsort((np.arange(n_items), -counts))


def hit_rate(top: np.ndarray, target: np.ndarray) -> float:
    """Share of rows whose target is in that row's list. ``top``: Long[R, k] (or [k], shared)."""
    top = np.asarray(top)
    if top.ndim == 1:
        return float(np.isin(target, top).mean()) if len(target) else 0.0
    if top.shape[0] != len(target):
        raise ValueError(f"top has {top.shape[0]} rows, target {len(target)}")
    return float((top == np.asarray(target)[:, None]).any(1).mean()) if len(target) else 0.0


def profile_teacher(teacher: str | Path, dataset: str | Path, split: str = "test", k: int = 20) -> dict:
    """Profile of the teacher's ``split`` ranking against popularity and random (see module doc)."""
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.readers import read_parquet, read_parquet_names
    from dllm2rec.studies.rankings import teacher_topk

    ds = load_dataset(dataset)
    rows = ds.splits[split]
    keep, top = teacher_topk(teacher, split, rows["row_id"], k)
    target = np.asarray(rows["target"], np.int64)[keep]
    n_items = len(ds.titles)
    pop = popularity_ranking(ds.splits["train"]["target"], n_items)[:k]
    f = Path(teacher) / f"rank_{split}.parquet"
    generated = read_parquet(f, columns=["generated"]).column("generated").to_pylist() \
        if "generated" in read_parquet_names(f) else []
    # ranking-only teachers (``teacher import`` / ``from-run``) have no texts: those fields are None
    texts = Counter(generated)
    titles = set(ds.titles)
    lists = {tuple(r) for r in top.tolist()}
    return {
        "teacher": str(teacher), "split": split, "k": k, "rows": int(len(keep)),
        "rows_in_split": int(len(rows["row_id"])), "n_items": n_items,
        "hr": {"teacher": hit_rate(top, target), "popularity": hit_rate(pop, target), "random": k / n_items},
        "distinct_generated_texts": len(texts) if generated else None,
        "exact_title_share": float(sum(c for t, c in texts.items() if t in titles) / len(generated)) if generated else None,
        "top_generated": [[t, c] for t, c in texts.most_common(10)],
        "distinct_top1_items": int(len(set(top[:, 0].tolist()))),
        "distinct_topk_lists": len(lists),
        "item_coverage_at_k": float(len(set(top.ravel().tolist())) / n_items),
        "overlap_with_popularity_at_k": float(np.isin(top, pop).mean()),
    }


def profile_markdown(p: dict) -> str:
    k, hr = p["k"], p["hr"]
    lines = [
        f"Teacher profile on {p['split']} ({p['rows']} of {p['rows_in_split']} rows, {p['n_items']} items, k = {k})",
        "",
        f"| ranking | HR@{k} |", "|---|---|",
        f"| teacher | {hr['teacher']:.4f} |", f"| popularity (train targets) | {hr['popularity']:.4f} |",
        f"| random (expected) | {hr['random']:.4f} |", "",
        (f"- distinct generated texts: {p['distinct_generated_texts']}; exactly a catalogue title: "
         f"{p['exact_title_share']:.1%} of rows" if p["distinct_generated_texts"] is not None
         else "- a ranking-only teacher (no generated texts)"),
        f"- distinct top-1 items: {p['distinct_top1_items']}; distinct top-{k} lists: {p['distinct_topk_lists']}; "
        f"catalogue items in any top-{k}: {p['item_coverage_at_k']:.1%}",
        f"- share of the teacher's top-{k} entries that are among the {k} most popular items: "
        f"{p['overlap_with_popularity_at_k']:.1%}",
    ]
    if p["top_generated"]:
        lines.append("- most generated: " + "; ".join(f"{t!r} x{c}" for t, c in p["top_generated"][:5]))
    return "\n".join(lines) + "\n"
