"""Collaborative grounding: the LLM's distance adjusted by a collaborative score (BIGRec's form).

BIGRec re-weights its grounding distance by item popularity; this module does that in the
project's own form, over ALL items of the catalogue:

    adjusted[q, j] = dist[q, j] * (1 + collab[q, j]) ** -gamma        (gamma >= 0)

with ``dist`` the exact un-squared L2 distance of plain grounding (``teacher.ground``) and
``collab >= 0`` one of:
- ``popularity``: training-target count of item j / the largest count (same for every row, in [0, 1]);
- ``cooc``: cosine similarity (clipped at 0) between the row's history profile and item j under
  item co-occurrence factors mined from the TRAINING split only (truncated SVD of the positive
  PMI matrix of (history item, target item) pairs); the neighbours are mined by FAISS
  (``IndexFlatIP`` over the normalised factors, top ``neighbours`` items per row; the others get 0).
A teacher grounded this way carries collaborative information: manifests record ``collab``.
``gamma = 0`` leaves every distance unchanged (``x ** -0.0 == 1.0`` exactly), so the ranking
equals plain grounding exactly (tested).
"""
from __future__ import annotations

import numpy as np

from dllm2rec.errors import ConfigError

KINDS = ("none", "popularity", "cooc")


def popularity_score(train_targets: np.ndarray, n_items: int) -> np.ndarray:
    """float32 [N] in [0, 1]: training-target counts / the largest count."""
    counts = np.bincount(np.asarray(train_targets, np.int64), minlength=n_items).astype(np.float64)
    return (counts / max(counts.max(), 1.0)).astype(np.float32)


def _pairs(history: np.ndarray, lengths: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(history item, target) id pairs of every row: [sum(lengths)] each."""
    mask = np.arange(history.shape[1])[None, :] < np.asarray(lengths)[:, None]
    rows = np.broadcast_to(np.asarray(targets)[:, None], history.shape)
    return history[mask].astype(np.int64), rows[mask].astype(np.int64)


def cooccurrence_factors(history: np.ndarray, lengths: np.ndarray, targets: np.ndarray, n_items: int,
                         dim: int = 64) -> np.ndarray:
    """float32 [N, dim] item factors from TRAINING rows: sqrt(S) U of the top-``dim`` SVD of PPMI.

    ``history`` int64 [R, L] right-padded, ``lengths`` [R], ``targets`` [R]. Co-occurrence counts
    the (history item, target) pairs of every row, symmetrised; PPMI = max(0, log(c_ij c / (c_i c_j))).
    Items never seen get zero vectors (no collaborative signal).
    """
    if not 0 < dim <= n_items:
        raise ConfigError(f"ground.collab_dim = {dim}: must be in 1..{n_items}")
    a, b = _pairs(history, lengths, targets)
    c = np.zeros((n_items, n_items), np.float64)
    np.add.at(c, (a, b), 1.0)
    c = c + c.T
    np.fill_diagonal(c, 0.0)
    row = c.sum(axis=1)
    total = row.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(c * total / np.outer(row, row))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
    # symmetric PSD-ish matrix: the eigen-decomposition is the SVD up to signs; keep the largest
    vals, vecs = np.linalg.eigh(ppmi)
    top = np.argsort(-np.abs(vals), kind="stable")[:dim]
    return (vecs[:, top] * np.sqrt(np.abs(vals[top]))[None, :]).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def history_profiles(factors: np.ndarray, history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """float32 [R, dim]: mean of the normalised factors of each row's history items, normalised."""
    unit = _normalise(factors)
    mask = (np.arange(history.shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    safe = np.where(mask > 0, history, 0)
    prof = (unit[safe] * mask[:, :, None]).sum(axis=1)
    return _normalise(prof)


def cooc_scores(factors: np.ndarray, history: np.ndarray, lengths: np.ndarray, neighbours: int) -> np.ndarray:
    """float32 [R, N]: FAISS-mined similarity of each row's history profile to its top items, else 0."""
    import faiss

    n_items = factors.shape[0]
    k = min(neighbours, n_items)
    index = faiss.IndexFlatIP(factors.shape[1])
    index.add(_normalise(factors))
    sims, ids = index.search(history_profiles(factors, history, lengths), k)
    out = np.zeros((len(history), n_items), np.float32)
    valid = ids >= 0
    rows = np.broadcast_to(np.arange(len(history))[:, None], ids.shape)
    out[rows[valid], ids[valid]] = np.maximum(sims[valid], 0.0)
    return out


def adjust(dist: np.ndarray, collab: np.ndarray, gamma: float) -> np.ndarray:
    """``dist * (1 + collab) ** -gamma`` (float64); ``collab`` [N] or [Q, N], broadcast over rows."""
    if gamma < 0:
        raise ConfigError(f"ground.gamma = {gamma}: must be >= 0")
    return dist * np.power(1.0 + np.asarray(collab, np.float64), -float(gamma))


def _check_float32(top: np.ndarray, own: np.ndarray, gamma: float) -> None:
    """Refuse adjusted distances that float32 (the stored dtype) cannot hold (see collab_rank)."""
    tiny = np.finfo(np.float32).tiny
    vals = np.concatenate([top.ravel(), own.ravel()])
    lost = int(((vals > 0) & (vals < tiny)).sum())
    if lost:
        raise ConfigError(f"ground.gamma = {gamma}: {lost} of {vals.size} stored distances (top-n and targets of "
                          f"one block) fall below float32's smallest normal number {tiny:.2e} and would be stored "
                          "as 0 or a denormal; the RD confidence weights would be uniform and gt_dist 0. "
                          "Choose a smaller gamma (sweep it with `teacher sweep-gamma`; 64 was safe on MovieLens-100K).")


def collab_rank(queries: np.ndarray, items: np.ndarray, collab: np.ndarray, gamma: float, top_n: int,
                targets: np.ndarray, chunk: int = 512, strict: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ground ``queries`` [Q, d] against ``items`` [N, d] by the adjusted distance.

    ``strict`` (the ground phase, which stores the distances): a ConfigError when a positive
    adjusted distance of a stored top-n entry or target falls below float32's smallest normal
    number: large gammas underflow it to 0 (or a denormal), which keeps the ranking but makes the
    RD confidence and the paper variant's reliability meaningless. Sweeps (ranks only) pass False.

    ``collab``: [N] (same for every row) or [Q, N]. Returns ``ids`` int64 [Q, top_n] and their
    adjusted distances float32 (ascending; ties by item id, as a stable sort), ``gt`` float32 [Q]
    (the target's adjusted distance) and ``target_rank`` int64 [Q] (1 + items strictly closer).
    Distances are exact float64 ``torch.cdist`` like ``teacher.ground.target_ranks``.
    """
    import torch

    if top_n > items.shape[0]:
        raise ConfigError(f"ground.top_n = {top_n} exceeds the number of items {items.shape[0]}")
    it = torch.from_numpy(np.ascontiguousarray(items)).double()
    per_row = np.ndim(collab) == 2
    q_n = len(queries)
    ids = np.empty((q_n, top_n), np.int64)
    dist = np.empty((q_n, top_n), np.float32)
    gt = np.empty(q_n, np.float32)
    ranks = np.empty(q_n, np.int64)
    for s in range(0, q_n, chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[s:s + chunk])).double()
        d = torch.cdist(q, it).numpy()
        adj = adjust(d, collab[s:s + chunk] if per_row else collab, gamma)
        order = np.argsort(adj, axis=1, kind="stable")[:, :top_n]
        ids[s:s + len(q)] = order
        dist[s:s + len(q)] = np.take_along_axis(adj, order, axis=1)
        own = adj[np.arange(len(q)), targets[s:s + chunk]]
        if strict:
            _check_float32(np.take_along_axis(adj, order, axis=1), own, gamma)
        gt[s:s + len(q)] = own
        ranks[s:s + len(q)] = (adj < own[:, None]).sum(axis=1) + 1
    return ids, dist, gt, ranks


def collab_scores(kind: str, train: dict, rows: dict, n_items: int, dim: int = 64, neighbours: int = 200,
                  factors: np.ndarray | None = None) -> np.ndarray:
    """The ``collab`` argument of ``collab_rank`` for ``rows`` (a split's column dict).

    ``train``: the TRAINING split's columns (``history``, ``history_len``, ``target``): the only
    source of collaborative statistics, so validation/test targets never leak in.
    """
    if kind == "popularity":
        return popularity_score(train["target"], n_items)
    if kind == "cooc":
        if factors is None:
            factors = cooccurrence_factors(train["history"], train["history_len"], train["target"], n_items, dim)
        return cooc_scores(factors, rows["history"], rows["history_len"], neighbours)
    raise ConfigError(f"ground.collab = {kind!r}: choose one of {KINDS}")
