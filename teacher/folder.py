"""One validator and writer for teacher folders built from any model's rankings.

Shared by ``python -m teacher import`` (a user's rankings file, ``teacher/importer.py``) and
``python -m teacher from-run`` (a trained student run, ``teacher/from_run.py``). The output is
the usual teacher folder (schema ``dllm2rec.teacher/1``, docs/ARCHITECTURE.md "Stage 2") that
``dllm2rec.data.knowledge.load_teacher``, ``analyze`` and the study table read.

Score kinds and the RD confidence input. The student's RD confidence weight is
``w_c(k) = exp(-d_k) / sum_j exp(-d_j)`` over the K candidates of a row (variant ``official``),
so only the differences ``d_k - d_1`` matter. Every score kind is turned into such a
distance-like ``d`` (stored as ``topk_dist``, ascending) so that the weight means the same thing
for every teacher, namely the teacher's own probability of candidate k renormalised over the K
candidates:

- ``distance`` (BIGRec: L2 from the generated text; lower = better): ``d = score`` as is
  (must be >= 0), so ``exp(-d)`` is BIGRec's weight, bit for bit.
- ``similarity``, ``logit``, ``logprob`` (higher = better): ``d_k = s_1 - s_k`` (0 for the top
  item, >= 0 below it). Then ``exp(-d_k) = exp(s_k) / exp(s_1)`` and ``w_c(k) = softmax(s)_k``
  over the K candidates: the teacher's probability ratio (logit: softmax probabilities;
  logprob: probabilities; similarity: read as a logit at temperature 1). The softmax over all
  items differs from this only by a per-row constant, which the normalisation cancels.

The optional per-row ground-truth score becomes ``gt_dist`` the same way (distance: as is;
others: ``max(s_1 - s_gt, 0)``, the truth's gap to the teacher's top item), used by the
``paper`` RD variant. Rows without teacher output are simply absent (``distill.min_coverage``).
The original scores are kept in ``topk_scores``; the manifest records ``score_kind``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllm2rec.atomic import atomic_dir, write_manifest
from dllm2rec.errors import ConfigError, DataError
from dllm2rec.eval.metrics import metrics_from_ranks

SCHEMA = "dllm2rec.teacher/1"
SCORE_KINDS = ("distance", "similarity", "logit", "logprob")
SPLITS = ("train", "valid", "test")


@dataclass
class Rankings:
    """One split's teacher output, sorted by row_id.

    row_id int64 [R]; topk_ids int64 [R, n] (best first); topk_scores float32 [R, n] as declared;
    gt_score float32 [R] or None; target_rank int64 [R] (1-based rank of the target among all N
    items) or None when only the lists are known.
    """

    row_id: np.ndarray
    topk_ids: np.ndarray
    topk_scores: np.ndarray
    gt_score: np.ndarray | None = None
    target_rank: np.ndarray | None = None


def check_kind(kind: str | None) -> str:
    if kind not in SCORE_KINDS:
        raise ConfigError(f"score kind {kind!r} is not declared or unknown; choose one of {list(SCORE_KINDS)}")
    return kind


def to_distance(scores: np.ndarray, kind: str) -> np.ndarray:
    """Float[R, n] scores of ``kind`` (best first) -> distance-like Float32[R, n] (module docstring)."""
    s = np.asarray(scores, dtype=np.float64)
    d = s if check_kind(kind) == "distance" else s[:, :1] - s
    return d.astype(np.float32)


def gt_to_distance(gt: np.ndarray, top: np.ndarray, kind: str) -> np.ndarray:
    """Ground-truth score Float[R] and the row's top score Float[R] -> gt distance Float32[R]."""
    if check_kind(kind) == "distance":
        return np.asarray(gt, dtype=np.float32)
    return np.maximum(np.asarray(top, np.float64) - np.asarray(gt, np.float64), 0.0).astype(np.float32)


def _dataset_rows(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted row ids, their split index into SPLITS, their target) over every split."""
    ids = np.concatenate([np.asarray(dataset.splits[s]["row_id"], np.int64) for s in SPLITS])
    split = np.concatenate([np.full(len(dataset.splits[s]["row_id"]), i) for i, s in enumerate(SPLITS)])
    target = np.concatenate([np.asarray(dataset.splits[s]["target"], np.int64) for s in SPLITS])
    order = np.argsort(ids, kind="stable")
    return ids[order], split[order], target[order]


def _first(mask: np.ndarray) -> int:
    return int(np.nonzero(mask)[0][0])


def check_rankings(file: str | Path, row_id: np.ndarray, topk_ids: np.ndarray, topk_scores: np.ndarray,
                   kind: str, dataset, min_top_n: int = 1, gt_score: np.ndarray | None = None,
                   target_rank: np.ndarray | None = None) -> dict[str, Rankings]:
    """Validate rankings given in file order and split them by the dataset's splits.

    ``topk_ids`` / ``topk_scores`` are [R, n] (the reader already refused ragged lists). Errors
    (``DataError`` naming ``file`` and the 0-based record): unknown or duplicated row ids, lists
    shorter than ``min_top_n``, ids outside 0..N-1 or repeated within a row, NaN/Inf scores,
    lists not sorted best first (distance ascending, other kinds descending), negative distances,
    positive log-probabilities; a ``target_rank`` outside 1..N or worse (larger) than the
    target's place in its own list (rank = 1 + #items scored strictly higher, so a listed target at place p has
    rank <= p; ties may make it smaller).
    """
    check_kind(kind)
    n_items = int(dataset.n_items)
    row_id = np.asarray(row_id, np.int64)
    ids = np.asarray(topk_ids, np.int64)
    scores = np.asarray(topk_scores, np.float64)
    if len(row_id) == 0:
        raise DataError(file, "has no rows")
    if ids.shape != scores.shape or ids.ndim != 2:
        raise DataError(file, f"topk_ids {ids.shape} and topk_scores {scores.shape} must be equal [rows, n]")
    if ids.shape[1] < min_top_n:
        raise DataError(file, f"lists have {ids.shape[1]} items, fewer than the required {min_top_n}", row=0)
    known, split_of, target_of = _dataset_rows(dataset)
    pos = np.clip(np.searchsorted(known, row_id), 0, len(known) - 1)
    unknown = known[pos] != row_id
    if unknown.any():
        r = _first(unknown)
        raise DataError(file, f"row_id {int(row_id[r])} is not a row of the dataset {dataset.path}", row=r)
    order = np.argsort(row_id, kind="stable")
    dup = np.nonzero(row_id[order][1:] == row_id[order][:-1])[0]
    if len(dup):
        r = int(order[dup[0] + 1])
        raise DataError(file, f"row_id {int(row_id[r])} appears more than once", row=r)
    bad = (ids < 0) | (ids >= n_items)
    if bad.any():
        r = _first(bad.any(1))
        raise DataError(file, f"item id {int(ids[r][bad[r]][0])} is outside 0..{n_items - 1}", row=r)
    srt = np.sort(ids, 1)
    rep = (srt[:, 1:] == srt[:, :-1]).any(1)
    if rep.any():
        raise DataError(file, "an item appears twice in topk_ids", row=_first(rep))
    nonfinite = ~np.isfinite(scores).all(1)
    if gt_score is not None:
        nonfinite |= ~np.isfinite(np.asarray(gt_score, np.float64))
    if nonfinite.any():
        raise DataError(file, "topk_scores (or gt_score) is NaN or infinite", row=_first(nonfinite))
    step = np.diff(scores, axis=1)
    unsorted = (step < 0).any(1) if kind == "distance" else (step > 0).any(1)
    if unsorted.any():
        how = "ascending (distance: nearest first)" if kind == "distance" else "descending (best first)"
        raise DataError(file, f"topk_scores are not sorted {how}", row=_first(unsorted))
    if kind == "distance" and (scores < 0).any():
        raise DataError(file, "a distance is negative", row=_first((scores < 0).any(1)))
    if kind == "logprob" and (scores > 0).any():
        raise DataError(file, "a log-probability is > 0", row=_first((scores > 0).any(1)))
    if target_rank is not None:
        target_rank = np.asarray(target_rank, np.int64)
        listed = list_ranks(ids, target_of[pos])  # n + 1 when the target is not listed
        bad = (target_rank < 1) | (target_rank > n_items) | ((listed <= ids.shape[1]) & (target_rank > listed))
        if bad.any():
            r = _first(bad)
            raise DataError(file, f"target_rank {int(target_rank[r])} is outside 1..{n_items} or worse than "
                                  f"the target's place {int(listed[r])} in its own list", row=r)
    out = {}
    for i, split in enumerate(SPLITS):
        sel = order[split_of[pos[order]] == i]
        if len(sel):
            gt = None if gt_score is None else np.asarray(gt_score, np.float32)[sel]
            tr = None if target_rank is None else target_rank[sel]
            out[split] = Rankings(row_id[sel], ids[sel], scores[sel].astype(np.float32), gt, tr)
    if "train" not in out:
        raise DataError(file, "covers no training row; the student needs the train split")
    return out


def targets_of(dataset, row_id: np.ndarray) -> np.ndarray:
    """Target item of each row id (ids must exist in the dataset)."""
    known, _, target = _dataset_rows(dataset)
    return target[np.searchsorted(known, row_id)]


def list_ranks(topk_ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of the target inside each list; n + 1 when it is not listed (censored)."""
    hit = topk_ids == target[:, None]
    return np.where(hit.any(1), hit.argmax(1) + 1, topk_ids.shape[1] + 1).astype(np.int64)


def check_embeddings(file: str | Path, emb: np.ndarray, n_items: int) -> np.ndarray:
    """Float32[N, d] item table; 2-D, N rows, finite."""
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise DataError(file, f"item embeddings must be 2-D [n_items, d], got shape {emb.shape}")
    if emb.shape[0] != n_items:
        raise DataError(file, f"item embeddings have {emb.shape[0]} rows but the dataset has {n_items} items")
    if not np.issubdtype(emb.dtype, np.number):
        raise DataError(file, f"item embeddings must be numeric, got {emb.dtype}")
    emb = emb.astype(np.float32)
    bad = ~np.isfinite(emb).all(1)
    if bad.any():
        raise DataError(file, "item embedding is NaN or infinite", row=_first(bad))
    return emb


def write_teacher_folder(out: str | Path, dataset, rankings: dict[str, Rankings], kind: str,
                         embeddings: np.ndarray, source: dict, ks=(1, 5, 10, 20, 50)) -> dict:
    """Write the teacher folder atomically (all files or nothing; manifest last) -> manifest.

    Metrics per split: from ``target_rank`` when known (exact), otherwise from the lists (only
    K <= n, where a target outside the list is a miss either way).
    """
    import pyarrow as pa

    from teacher.artifacts import write_parquet, write_tensors

    emb = check_embeddings(source.get("embeddings_file", "item embeddings"), embeddings, int(dataset.n_items))
    top_n = int(rankings["train"].topk_ids.shape[1])
    counts, metrics = {}, {}
    with atomic_dir(out) as tmp:
        for split, r in rankings.items():
            cols = {
                "row_id": pa.array(r.row_id, pa.int64()),
                "topk_ids": pa.array(list(r.topk_ids.astype(np.int32)), pa.list_(pa.int32())),
                "topk_dist": pa.array(list(to_distance(r.topk_scores, kind)), pa.list_(pa.float32())),
                "topk_scores": pa.array(list(r.topk_scores.astype(np.float32)), pa.list_(pa.float32())),
            }
            if r.gt_score is not None:
                cols["gt_dist"] = pa.array(gt_to_distance(r.gt_score, r.topk_scores[:, 0], kind), pa.float32())
            if r.target_rank is not None:
                cols["target_rank"] = pa.array(r.target_rank, pa.int64())
                ranks, use = r.target_rank, ks
            else:
                ranks = list_ranks(r.topk_ids, targets_of(dataset, r.row_id))
                use = [k for k in ks if k <= r.topk_ids.shape[1]]
            write_parquet(pa.table(cols), tmp / f"rank_{split}.parquet")
            counts[split] = len(r.row_id)
            metrics[split] = metrics_from_ranks(ranks, use)
        write_tensors({"embeddings": emb}, tmp / "item_embeddings.safetensors")
        manifest = {
            "schema": SCHEMA, "base_model": source.get("base_model"), "adapter": None,
            "engine": {"source": source.get("kind", "import")}, "decoding": None, "pooling": None,
            "normalized": False, "distance": "l2" if kind == "distance" else f"{kind}_gap_to_top",
            "score_kind": kind, "index": None, "top_n": top_n, "emb_dim": int(emb.shape[1]),
            "emb_dtype": "float32", "n_items": int(dataset.n_items), "id_map_hash": dataset.id_map_hash,
            "dataset": str(dataset.path), "splits": counts, "limit": None, "metrics": metrics,
            "metrics_from": "target_rank" if all(r.target_rank is not None for r in rankings.values()) else "lists",
            "source": source,
        }
        write_manifest(tmp, manifest)
    return manifest
