"""``python -m teacher.query_study``: history-query kinds x gamma on a split, one process.

For a teacher config whose catalogue embedding is finished (``teacher embed`` with
``query.kind`` history_*: ``work/embed/items``), ranks EVERY row of ``--split`` for each query kind
of ``--kinds`` (``history_mean``, ``history_last``, ``history_decay:<decay>``) and each gamma of
``--gammas`` with collaborative grounding ``l2 * (1 + cooc) ** -gamma`` (gamma 0 = plain L2
grounding exactly), plus the co-occurrence score alone (no language: rank = 1 + items with a
higher score + other items with an equal score, i.e. ties broken against the target). The
ranks are those of ``teacher sweep-gamma`` / ``teacher ground`` (the same ``collab.adjust`` on
float64 ``torch.cdist`` distances; the distances are computed once per kind, not once per gamma).

Gamma is chosen by ``--select`` on the first ``--select-rows`` rows (positions, time order) among
gammas <= ``--max-gamma`` (default 64: at gamma 1000 the adjusted distances ``l2 * (1 + c) ** -gamma``
underflow float32, the dtype of ``topk_dist`` / ``gt_dist``, to 0 and the RD confidence weights
become uniform) and reported on the rest (held out) and on all rows. Output: ``<output_dir>/query_study_<split>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _kinds(spec: str) -> list[tuple[str, float]]:
    out = []
    for tok in [t for t in spec.split(",") if t]:
        name, _, decay = tok.partition(":")
        out.append((name, float(decay) if decay else 1.0))
    return out


def _cooc_only_ranks(score: np.ndarray, targets: np.ndarray) -> np.ndarray:
    own = score[np.arange(len(targets)), targets][:, None]
    return (score > own).sum(axis=1) + (score == own).sum(axis=1)  # ties counted against the target


def study(cfg, kinds: str, gammas: list[float], split: str, select: str, select_rows: int,
          max_gamma: float = float("inf")) -> dict:
    import torch

    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.eval.metrics import metrics_from_ranks
    from teacher.artifacts import gather_item_embeddings, load_teacher_data, work_dir
    from teacher.collab import adjust, collab_scores, cooccurrence_factors
    from teacher.config import split_limits
    from teacher.fingerprints import embed_fingerprint
    from teacher.query import row_queries

    g = cfg.ground
    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    items = gather_item_embeddings(work_dir(cfg), embed_fingerprint(cfg, data), data.n_items)
    cols = data.splits[split]
    targets = cols["target"].astype(np.int64)
    t0 = time.perf_counter()
    train = load_dataset(cfg.dataset).splits["train"]
    factors = cooccurrence_factors(train["history"], train["history_len"], train["target"], data.n_items, g.collab_dim)
    score = collab_scores("cooc", train, cols, data.n_items, g.collab_dim, g.collab_neighbours, factors)
    cooc_secs = time.perf_counter() - t0
    parts = {"select": slice(0, select_rows), "held_out": slice(select_rows, None), "all": slice(None)}

    def metrics(ranks):
        return {k: metrics_from_ranks(ranks[s], g.ks) for k, s in parts.items()}

    rows = [{"kind": "cooc_only", "decay": None, "gamma": None, **metrics(_cooc_only_ranks(score, targets))}]
    it = torch.from_numpy(items).double()
    for kind, decay in _kinds(kinds):
        kcfg = replace(cfg, query=replace(cfg.query, kind=kind, decay=decay))
        _, q = row_queries(kcfg, data, split, items)
        t1 = time.perf_counter()
        dist = torch.cdist(torch.from_numpy(q).double(), it).numpy()
        for gamma in gammas:
            adj = adjust(dist, score, gamma)
            own = adj[np.arange(len(targets)), targets][:, None]
            rows.append({"kind": kind, "decay": decay if kind == "history_decay" else None, "gamma": gamma,
                         **metrics((adj < own).sum(axis=1) + 1)})
        print(f"{kind} decay={decay}: {len(gammas)} gammas in {time.perf_counter() - t1:.1f} s", flush=True)
    best = {}
    for r in rows:
        key = (r["kind"], r["decay"])
        if r["gamma"] is not None and r["gamma"] > max_gamma:
            continue
        if key not in best or r["select"][select] > best[key]["select"][select]:
            best[key] = r
    return {"split": split, "rows": len(targets), "select_rows": select_rows, "select": select, "max_gamma": max_gamma,
            "embed_engine": cfg.embed.engine, "cooc_seconds": round(cooc_secs, 2), "results": rows,
            "best": [[r["kind"], r["decay"], r["gamma"]] for r in best.values()]}


def markdown(res: dict, ks=("hr@20", "ndcg@20")) -> str:
    n, s = res["rows"], res["select_rows"]
    head = (f"embed.engine={res['embed_engine']}, {res['split']} rows: select = positions 0:{s}, "
            f"held out = {s}:{n}, all = {n}; * = gamma <= {res['max_gamma']:g} chosen by {res['select']} on the select rows")
    lines = [head, "", "| query | gamma | " + " | ".join(f"{p} {k}" for p in ("select", "held-out", "all") for k in ks) + " |",
             "|---" * (2 + 3 * len(ks)) + "|"]
    chosen = {tuple(b) for b in res["best"]}
    for r in res["results"]:
        name = r["kind"] + (f"({r['decay']:g})" if r["decay"] is not None else "")
        star = "*" if (r["kind"], r["decay"], r["gamma"]) in chosen and r["gamma"] is not None else ""
        vals = " | ".join(f"{r[p][k]:.4f}" for p in ("select", "held_out", "all") for k in ks)
        gamma = "-" if r["gamma"] is None else f"{r['gamma']:g}"
        lines.append(f"| {name} | {gamma}{star} | {vals} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from dllm2rec.atomic import atomic_write_json, atomic_write_text
    from teacher.config import load_teacher_config

    p = argparse.ArgumentParser(prog="python -m teacher.query_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--kinds", default="history_mean,history_last,history_decay:0.5,history_decay:0.7,history_decay:0.85")
    p.add_argument("--gammas", default="0,0.5,1,2,4,8,16,32,1000")
    p.add_argument("--split", default="valid")
    p.add_argument("--select", default="ndcg@20")
    p.add_argument("--select-rows", type=int, default=None, help="default: the first half of the split")
    p.add_argument("--max-gamma", type=float, default=64.0,
                   help="choose gamma only up to this: (1 + c) ** -gamma must stay a float32 number, because "
                        "topk_dist / gt_dist are stored as float32 and feed the RD confidence weights")
    a = p.parse_args(argv)
    cfg = load_teacher_config(a.config, a.overrides)
    from teacher.artifacts import load_teacher_data

    n = len(load_teacher_data(cfg.dataset).splits[a.split]["row_id"])
    res = study(cfg, a.kinds, [float(x) for x in a.gammas.split(",")], a.split, a.select, a.select_rows or n // 2, a.max_gamma)
    stem = Path(cfg.output_dir) / f"query_study_{a.split}"
    atomic_write_json(stem.parent / f"{stem.name}.json", res)
    atomic_write_text(stem.parent / f"{stem.name}.md", markdown(res))
    print(markdown(res))
    print(json.dumps({"best": res["best"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
