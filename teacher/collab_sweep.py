"""``python -m teacher sweep-gamma``: choose the collaborative-grounding gamma on validation.

Reads the finished ``embed`` shards of ``--split`` (default valid; with ``query.kind`` history_*
the queries are built from the history items instead, ``teacher.query``) and of the items (the same
folder ``teacher ground`` reads), ranks every row by ``teacher.collab.collab_rank`` for each gamma
of ``--gammas`` with ``ground.collab`` (popularity | cooc) and reports HR/NDCG at ``ground.ks``
from the exact target ranks; ``--rows a:b`` restricts to a block of rows (positions in row order), so
gamma can be chosen on one block and checked on another. Nothing is written to the teacher folder; the table goes to stdout
and ``<output_dir>/gamma_sweep_<collab>_<split>.{json,md}``. The best gamma (by ``--select``,
default ndcg@20) is then used with ``ground.gamma=<best>`` for ``teacher ground`` / ``merge``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dllm2rec.errors import ConfigError


def _row_slice(spec: str) -> slice:
    """``"a:b"`` (positions in the split's row order, either end optional) -> slice."""
    try:
        a, _, b = spec.partition(":")
        return slice(int(a) if a else None, int(b) if b else None)
    except ValueError as exc:
        raise ConfigError(f"--rows {spec!r}: expected start:stop, e.g. 0:256") from exc


def sweep_gamma(cfg, gammas: list[float], split: str = "valid", select: str = "ndcg@20", rows: str = ":") -> dict:
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.eval.metrics import metrics_from_ranks
    from teacher.artifacts import gather_item_embeddings, load_teacher_data, read_tensors, work_dir
    from teacher.collab import collab_rank, collab_scores, cooccurrence_factors
    from teacher.config import split_limits
    from teacher.fingerprints import embed_fingerprint
    from teacher.query import is_history, row_queries
    from teacher.shards import finished_parts

    g = cfg.ground
    if g.collab == "none":
        raise ConfigError("sweep-gamma: set ground.collab=popularity or ground.collab=cooc")
    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    work, efp = work_dir(cfg), embed_fingerprint(cfg, data)
    items = gather_item_embeddings(work, efp, data.n_items)
    if is_history(cfg):  # generation-free queries from the history items (teacher/query.py)
        row_id, q = row_queries(cfg, data, split, items)
    else:
        parts = [read_tensors(p.path("safetensors")) for p in finished_parts(work, "embed", split, efp)]
        row_id = np.concatenate([t["row_id"] for t in parts]).astype(np.int64)
        q = np.concatenate([t["embeddings"].reshape(len(t["row_id"]), -1) for t in parts if len(t["row_id"])]).astype(np.float32)
    order = np.argsort(row_id, kind="stable")[_row_slice(rows)]  # a held-out block of rows
    row_id, q = row_id[order], q[order]
    if not len(row_id):
        raise ConfigError(f"--rows {rows!r}: selects no row of the {len(order)} embedded {split} rows")
    cols = data.splits[split]
    where = {int(r): i for i, r in enumerate(cols["row_id"])}
    idx = np.array([where[int(r)] for r in row_id], np.int64)
    hist = {"history": cols["history"][idx], "history_len": cols["history_len"][idx]}
    targets = cols["target"][idx].astype(np.int64)
    train = load_dataset(cfg.dataset).splits["train"]
    factors = (cooccurrence_factors(train["history"], train["history_len"], train["target"], data.n_items, g.collab_dim)
               if g.collab == "cooc" else None)
    score = collab_scores(g.collab, train, hist, data.n_items, g.collab_dim, g.collab_neighbours, factors)
    results = []
    for gamma in gammas:
        _, _, _, ranks = collab_rank(q, items, score, gamma, 1, targets)
        results.append({"gamma": gamma, **metrics_from_ranks(ranks, g.ks)})
    if select not in results[0]:
        raise ConfigError(f"--select {select!r}: choose one of {sorted(k for k in results[0] if k != 'gamma')}")
    best = max(results, key=lambda r: (r[select], -r["gamma"]))
    return {"collab": g.collab, "split": split, "rows": int(len(row_id)), "row_slice": rows, "select": select, "best_gamma": best["gamma"],
            "dim": g.collab_dim, "neighbours": g.collab_neighbours, "results": results}


def sweep_markdown(res: dict) -> str:
    keys = [k for k in res["results"][0] if k != "gamma"]
    lines = [f"Collaborative grounding ({res['collab']}) on {res['rows']} {res['split']} rows (positions {res['row_slice']}); "
             f"best gamma by {res['select']}: {res['best_gamma']}", "",
             "| gamma | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in res["results"]:
        lines.append(f"| {r['gamma']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(cfg, gammas: str, split: str, select: str, rows: str = ":") -> dict:
    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    try:
        values = [float(x) for x in gammas.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"--gammas {gammas!r}: expected comma-separated numbers") from exc
    if not values or min(values) < 0:
        raise ConfigError(f"--gammas {gammas!r}: need at least one value, all >= 0")
    res = sweep_gamma(cfg, values, split, select, rows)
    tag = "" if rows in (":", "") else "_rows" + rows.replace(":", "-")
    if cfg.query.kind != "generated":  # several history query kinds can share one output_dir
        tag = f"_{cfg.query.kind}" + (f"{cfg.query.decay:g}" if cfg.query.kind == "history_decay" else "") + tag
    stem = Path(cfg.output_dir) / f"gamma_sweep_{cfg.ground.collab}_{split}{tag}"
    # not with_suffix: a decay such as 0.6 in the name would be taken for a suffix
    atomic_write_json(stem.parent / f"{stem.name}.json", res)
    atomic_write_text(stem.parent / f"{stem.name}.md", sweep_markdown(res))
    print(sweep_markdown(res))
    return res
