"""Grounding: generated-text embeddings -> nearest items by exact (un-squared) L2 distance.

- ``search(queries, items, top_n, index="flat", ...) -> (ids int64 [Q, n], dist float32 [Q, n])``:
  FAISS ``IndexFlatL2`` (exact) or optional ``ivf`` / ``hnsw`` (approximate), batched queries.
  FAISS returns SQUARED L2; we return ``sqrt(max(d2, 0))`` (nearest first, ascending).
- ``exact_topk_torch(queries, items, top_n)``: brute force ``torch.cdist`` + argsort (reference).
- ``gt_distance(queries, items, targets) -> float32 [Q]``: distance to the ground-truth item.
- ``target_ranks(queries, items, targets) -> int64 [Q]``: 1-based rank of the target among ALL
  items by distance (1 + number of items strictly closer), chunked torch; gives the teacher's
  own HR/NDCG through ``metrics_from_ranks``.
- ``ground_phase(cfg, rank, world)``: sharded, resumable; queries = the generated texts'
  embeddings, or with ``query.kind`` history_* the history-item means of ``teacher.query``; writes ``work/ground/<split>/part-*.parquet``
  with ``row_id``, ``topk_ids`` list<int32>, ``topk_dist`` list<float32>, ``gt_dist`` float32,
  ``target_rank`` int64. Needs the finished item-embedding shards of ALL ranks. With
  ``ground.collab`` popularity | cooc the distances are ``teacher.collab``'s adjusted ones
  (``l2 * (1 + collab) ** -gamma``, exact over all items) and the teacher is collaborative.
"""
from __future__ import annotations

import time

import numpy as np

from dllm2rec.errors import ConfigError
from teacher.config import split_limits
from teacher.fingerprints import embed_fingerprint, ground_fingerprint


def build_index(items: np.ndarray, index: str = "flat", nlist: int = 64, nprobe: int = 16,
                hnsw_m: int = 32, ef_search: int = 128):
    import faiss

    items = np.ascontiguousarray(items, dtype=np.float32)
    d = items.shape[1]
    if index == "flat":
        idx = faiss.IndexFlatL2(d)
    elif index == "ivf":
        nlist = max(1, min(nlist, items.shape[0] // 4 or 1))  # k-means needs several points per list
        # the Python wrapper keeps the quantizer alive for the index's lifetime
        idx = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
        idx.train(items)
        idx.nprobe = min(nprobe, nlist)
    elif index == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_L2)
        idx.hnsw.efSearch = max(ef_search, 1)
    else:
        raise ConfigError(f"ground.index {index!r}: choose flat, ivf or hnsw")
    idx.add(items)
    return idx


def search(queries: np.ndarray, items: np.ndarray, top_n: int, index: str = "flat", batch_size: int = 1024,
           built=None, **index_kw) -> tuple[np.ndarray, np.ndarray]:
    """Top-``top_n`` nearest items per query; distances un-squared, ascending."""
    if items.ndim != 2 or queries.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"shape mismatch: queries {queries.shape} vs items {items.shape}")
    if top_n > items.shape[0]:
        raise ConfigError(f"ground.top_n = {top_n} exceeds the number of items {items.shape[0]}")
    idx = built if built is not None else build_index(items, index, **index_kw)
    ids = np.empty((queries.shape[0], top_n), np.int64)
    dist = np.empty((queries.shape[0], top_n), np.float32)
    for start in range(0, queries.shape[0], batch_size):
        q = np.ascontiguousarray(queries[start:start + batch_size], dtype=np.float32)
        d2, i = idx.search(q, top_n)
        ids[start:start + len(q)] = i
        dist[start:start + len(q)] = np.sqrt(np.maximum(d2, 0.0))
    return ids, dist


def exact_topk_torch(queries: np.ndarray, items: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: ``torch.cdist`` (float64) + stable argsort."""
    import torch

    d = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(items).double())
    order = torch.argsort(d, dim=1, stable=True)[:, :top_n]
    return order.numpy(), torch.gather(d, 1, order).float().numpy()


def gt_distance(queries: np.ndarray, items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    diff = queries.astype(np.float64) - items[targets].astype(np.float64)
    return np.sqrt((diff * diff).sum(axis=1)).astype(np.float32)


def target_ranks(queries: np.ndarray, items: np.ndarray, targets: np.ndarray, chunk: int = 512) -> np.ndarray:
    """1 + number of items strictly closer than the target (exact L2, float64 in chunks)."""
    import torch

    it = torch.from_numpy(items).double()
    out = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[start:start + chunk]).double()
        d = torch.cdist(q, it)
        t = torch.from_numpy(targets[start:start + chunk]).long()
        own = d.gather(1, t[:, None])
        out[start:start + len(q)] = ((d < own).sum(dim=1) + 1).numpy()
    return out


def recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-n found by the approximate search."""
    hits = [len(set(a.tolist()) & set(e.tolist())) / e.shape[0] for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits)) if hits else 1.0


def _list_column(matrix: np.ndarray):
    """[R, n] numpy -> Arrow list<...> column (variable-length list type, as the schema says)."""
    import pyarrow as pa

    offsets = pa.array(np.arange(matrix.shape[0] + 1, dtype=np.int32) * matrix.shape[1], pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def ground_phase(cfg, rank: int, world: int, progress: bool = True) -> dict:
    import faiss
    import pyarrow as pa

    from teacher.artifacts import gather_item_embeddings, load_teacher_data, work_dir, write_parquet
    from teacher.query import is_history, row_queries
    from teacher.shards import ShardError, is_done, mark_done, part, shard_slice

    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    fp, efp = ground_fingerprint(cfg, data), embed_fingerprint(cfg, data)
    work = work_dir(cfg)
    todo = [s for s in cfg.splits if not is_done(part(work, "ground", s, rank, world), fp)]
    stats: dict = {"skipped": [s for s in cfg.splits if s not in todo], "done": []}
    if not todo:
        return stats
    g = cfg.ground
    items = gather_item_embeddings(work, efp, data.n_items)
    faiss.omp_set_num_threads(max(1, cfg.embed.threads or 1))
    idx = build_index(items, g.index, g.nlist, g.nprobe, g.hnsw_m, g.ef_search)
    target_of = {int(r): int(t) for r, t in zip(np.concatenate([data.splits[s]["row_id"] for s in todo]),
                                                np.concatenate([data.splits[s]["target"] for s in todo]))}
    for split in todo:
        t0 = time.perf_counter()
        if is_history(cfg):  # this shard's rows, as `teacher generate` would shard them
            row_id, q = row_queries(cfg, data, split, items, shard_slice(len(data.splits[split]["row_id"]), rank, world))
        else:
            row_id, q = _embedded_queries(work, split, rank, world, efp, items.shape[1])
            t0 = time.perf_counter()
        targets = np.array([target_of[int(r)] for r in row_id], np.int64)
        info: dict = {}
        if g.collab != "none":
            ids, dist, gt, ranks = _collab_ground(cfg, data, split, row_id, q, items, targets)
        else:
            ids, dist = search(q, items, g.top_n, g.index, g.batch_size, built=idx)
            gt, ranks = gt_distance(q, items, targets), target_ranks(q, items, targets)
        if g.index != "flat" and g.collab == "none" and len(q):
            n = min(g.recall_sample, len(q))
            exact, _ = search(q[:n], items, g.top_n, "flat")
            info["recall"] = recall(ids[:n], exact)
            if info["recall"] < g.min_recall:
                raise ShardError(f"ground.index={g.index}: recall@{g.top_n} {info['recall']:.4f} < ground.min_recall {g.min_recall}")
        table = pa.table({
            "row_id": pa.array(row_id, pa.int64()),
            "topk_ids": _list_column(ids.astype(np.int32)),
            "topk_dist": _list_column(dist.astype(np.float32)),
            "gt_dist": pa.array(gt, pa.float32()),
            "target_rank": pa.array(ranks, pa.int64()),
        })
        p = part(work, "ground", split, rank, world)
        write_parquet(table, p.path("parquet"))
        secs = time.perf_counter() - t0
        mark_done(p, fp, rows=int(len(row_id)), seconds=round(secs, 3), **info)
        stats["done"].append({"split": split, "rows": int(len(row_id)), "seconds": round(secs, 3), **info})
    return stats


def _embedded_queries(work, split: str, rank: int, world: int, efp: str, width: int):
    """(row_id int64 [R], queries float32 [R, d]) of this shard's generated-text embeddings."""
    from teacher.artifacts import read_tensors
    from teacher.shards import ShardError, is_done, part

    src = part(work, "embed", split, rank, world)
    if not is_done(src, efp):
        raise ShardError(f"{work}/embed/{split}: shard {rank} of {world} is not finished; run `teacher embed` first")
    t = read_tensors(src.path("safetensors"))
    row_id = t["row_id"].astype(np.int64)
    q = t["embeddings"].astype(np.float32).reshape(len(row_id), -1) if len(row_id) else np.zeros((0, width), np.float32)
    if q.shape[1] != width:
        raise ShardError(f"{src.path('safetensors')}: embedding width {q.shape[1]} != item width {width}")
    return row_id, q


def _collab_ground(cfg, data, split: str, row_id: np.ndarray, q: np.ndarray, items: np.ndarray,
                   targets: np.ndarray, block: int = 4096):
    """``teacher.collab.collab_rank`` for this shard's rows, in blocks (a [block, N] score matrix).

    Collaborative statistics come from the dataset's FULL training split (never valid/test),
    whatever ``limits.train`` says about the rows the teacher ranks.
    """
    from dllm2rec.data.dataset import load_dataset
    from teacher.collab import collab_rank, collab_scores, cooccurrence_factors

    g = cfg.ground
    train = load_dataset(cfg.dataset).splits["train"]
    cols = data.splits[split]
    where = {int(r): i for i, r in enumerate(cols["row_id"])}
    idx = np.array([where[int(r)] for r in row_id], np.int64)
    rows = {"history": cols["history"][idx], "history_len": cols["history_len"][idx]}
    factors = (cooccurrence_factors(train["history"], train["history_len"], train["target"], data.n_items, g.collab_dim)
               if g.collab == "cooc" else None)
    out = []
    for s in range(0, len(idx), block):
        part_rows = {k: v[s:s + block] for k, v in rows.items()}
        score = collab_scores(g.collab, train, part_rows, data.n_items, g.collab_dim, g.collab_neighbours, factors)
        out.append(collab_rank(q[s:s + block], items, score, g.gamma, g.top_n, targets[s:s + block], strict=True))
    if not out:
        z = np.zeros((0, g.top_n))
        return z.astype(np.int64), z.astype(np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return tuple(np.concatenate(parts) for parts in zip(*out))
