"""Grounding queries: what vector each row is grounded from.

``query.kind`` (teacher/config.py ``QueryConfig``):
- ``generated`` (BIGRec, the default): the embedding of the title the LLM generated for the row
  (``work/embed/<split>`` shards written by ``teacher embed``; needs ``teacher generate``);
- ``history_mean`` / ``history_last`` / ``history_decay``: generation-free. The query is a weighted
  mean of the row's HISTORY item-title embeddings, the same catalogue embeddings
  (``work/embed/items``) the items are grounded against. No LLM generation at all: the cost is the
  catalogue embedding plus grounding.

Weights over a row's ``n`` valid history positions (``history`` is oldest first, right-padded with
``padding_id = N``; padding positions get weight 0, so they never contribute):
- ``history_mean``: ``1 / n`` each;
- ``history_last``: 1 on the newest item (position ``n - 1``), 0 elsewhere;
- ``history_decay``: ``decay ** (n - 1 - j)`` at position ``j`` (newest = 1), normalised to sum 1.
A row with ``history_len == 0`` (the dataset schema forbids it) would get the zero vector.
"""
from __future__ import annotations

import numpy as np

from dllm2rec.errors import ConfigError

KINDS = ("generated", "history_mean", "history_last", "history_decay")


def is_history(cfg) -> bool:
    """True when the teacher's queries come from history items (no generation phase)."""
    return cfg.query.kind != "generated"


def history_weights(lengths: np.ndarray, width: int, kind: str, decay: float = 1.0) -> np.ndarray:
    """float64 [R, width]: per-position weights, each row summing to 1 over its valid positions."""
    lengths = np.asarray(lengths, np.int64)
    pos = np.arange(width)[None, :]
    valid = pos < lengths[:, None]
    if kind == "history_mean":
        w = valid.astype(np.float64)
    elif kind == "history_last":
        w = (pos == lengths[:, None] - 1).astype(np.float64)
    elif kind == "history_decay":
        if not 0.0 < decay <= 1.0:
            raise ConfigError(f"query.decay = {decay}: must be in (0, 1]")
        age = np.maximum(lengths[:, None] - 1 - pos, 0)  # 0 for the newest item
        w = np.where(valid, np.power(float(decay), age), 0.0)
    else:
        raise ConfigError(f"query.kind = {kind!r}: history weights need one of {KINDS[1:]}")
    total = w.sum(axis=1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


def history_queries(items: np.ndarray, history: np.ndarray, lengths: np.ndarray, kind: str,
                    decay: float = 1.0) -> np.ndarray:
    """float32 [R, d]: ``sum_j w[r, j] * items[history[r, j]]`` (float64 accumulation).

    ``items`` [N, d]; ``history`` int64 [R, L] with any padding id (padding is masked by
    ``lengths``, never indexed); ``lengths`` [R].
    """
    history = np.asarray(history, np.int64)
    w = history_weights(lengths, history.shape[1], kind, decay)
    safe = np.where(w > 0, history, 0)  # padding ids (= N) would index out of range
    if len(history) and (safe.min() < 0 or safe.max() >= items.shape[0]):
        raise ConfigError(f"history item ids must be in 0..{items.shape[0] - 1} at valid positions")
    out = np.einsum("rl,rld->rd", w, items.astype(np.float64)[safe])
    return out.astype(np.float32)


def row_queries(cfg, data, split: str, items: np.ndarray, rows: slice | np.ndarray = slice(None)):
    """History queries of ``data.splits[split]`` rows ``rows`` (a slice or positions).

    Returns ``(row_id int64 [R], queries float32 [R, d])`` in the split's row order.
    """
    cols = data.splits[split]
    hist, lens = cols["history"][rows], cols["history_len"][rows]
    q = history_queries(items, hist, lens, cfg.query.kind, cfg.query.decay)
    return cols["row_id"][rows].astype(np.int64), q


def describe(cfg) -> dict:
    """The manifest's ``query`` entry: says where the grounding vectors came from."""
    if not is_history(cfg):
        return {"kind": "generated", "source": "embedding of the LLM-generated title"}
    out = {"kind": cfg.query.kind, "source": "weighted mean of the history items' title embeddings",
           "generation": False}
    if cfg.query.kind == "history_decay":
        out["decay"] = cfg.query.decay
    return out
