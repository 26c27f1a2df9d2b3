"""Top-k retrieval over a student's output layer: dense matmul or FAISS inner-product search.

A student scores item j as ``s_j = h . w_j + b_j`` (``output = nn.Linear(H, N)``). The bias is
folded into an inner product by augmenting both sides: query ``[h, 1]`` against item vectors
``[w_j, b_j]`` (both [*, H+1]), so any maximum-inner-product index returns the same ranking.

Backends (``build_retriever(weight, bias, method=...)``):
- ``dense``: chunked ``h @ W^T + b`` then ``torch.topk`` per item chunk, merged. Exact.
- ``flat``: FAISS ``IndexFlatIP`` over the augmented vectors. Exact (equals ``dense`` up to
  float rounding and tie order).
- ``hnsw`` / ``ivf``: approximate FAISS indexes; use ``measure_recall`` to know what they cost.
- ``auto``: per request: ``flat`` when the catalogue has at least ``auto_threshold`` items AND
  the batch has fewer than ``AUTO_MAX_FAISS_BATCH`` rows, ``dense`` otherwise. Why (measured with
  ``bench serve``, 1 thread, 2-core box): the faiss-cpu wheel's IndexFlatIP costs ~25 ns per
  (query, item) pair whatever the batch, so it beats the matmul only for single queries over
  large catalogues (1M items: 28 vs 44 CPU ms per row at batch 1), while BLAS matmul + topk is
  5x cheaper per row from batch 32 on. Both are exact, so switching never changes the answer
  (ties aside).

Every retriever has ``search(h: Float[B, H], k, exclude: Long[B, L] | None) -> (scores
Float[B, k], ids Long[B, k])``, best first. ``exclude`` holds item ids to drop per row (e.g. the
history), ids outside ``0..N-1`` (the padding id N) are ignored. If fewer than ``k`` items remain
the tail is filled with id -1 and score -inf.
"""
from __future__ import annotations

import math

import numpy as np
import torch

METHODS = ("auto", "dense", "flat", "hnsw", "ivf")
DEFAULT_AUTO_THRESHOLD = 100_000  # items; see "auto" in the module docstring
AUTO_MAX_FAISS_BATCH = 20  # rows; FAISS's own BLAS threshold is also 20 queries


def augment_items(weight: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    """Item vectors ``[w_j, b_j]``: Float32[N, H+1] (contiguous, for FAISS)."""
    w = weight.detach().to(torch.float32).cpu()
    b = torch.zeros(w.shape[0]) if bias is None else bias.detach().to(torch.float32).cpu()
    return np.ascontiguousarray(torch.cat([w, b[:, None]], dim=1).numpy())


def augment_queries(h: torch.Tensor) -> np.ndarray:
    """Query vectors ``[h, 1]``: Float32[B, H+1]."""
    h = h.detach().to(torch.float32).cpu()
    return np.ascontiguousarray(torch.cat([h, torch.ones(h.shape[0], 1)], dim=1).numpy())


def _exclusion_width(exclude: torch.Tensor | None) -> int:
    return 0 if exclude is None else int(exclude.shape[1])


def _drop_excluded(scores: torch.Tensor, ids: torch.Tensor, exclude: torch.Tensor | None,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove excluded ids from a best-first candidate list [B, k+L] and keep the first k.

    Stable: the order of the remaining candidates is kept.
    """
    if exclude is not None and exclude.numel():
        hit = (ids[:, :, None] == exclude[:, None, :]).any(dim=2) | (ids < 0)
    else:
        hit = ids < 0
    # Stable sort on the "dropped" flag moves kept candidates to the front in their order.
    order = torch.sort(hit.to(torch.int8), dim=1, stable=True).indices
    ids = torch.gather(ids, 1, order)[:, :k]
    scores = torch.gather(scores, 1, order)[:, :k]
    dropped = torch.gather(hit, 1, order)[:, :k]
    ids = ids.masked_fill(dropped, -1)
    scores = scores.masked_fill(dropped, float("-inf"))
    return scores, ids


class DenseRetriever:
    """Exact top-k by chunked matmul. ``item_chunk`` bounds memory at B x item_chunk floats."""

    method = "dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, item_chunk: int = 65536):
        self.weight = weight.detach().to(torch.float32).cpu().contiguous()
        n = self.weight.shape[0]
        self.bias = (torch.zeros(n) if bias is None else bias.detach().to(torch.float32).cpu()).contiguous()
        self.n_items = n
        self.item_chunk = int(item_chunk)

    @torch.no_grad()
    def search(self, h: torch.Tensor, k: int, exclude: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        h = h.detach().to(torch.float32).cpu()
        b = h.shape[0]
        best_s = torch.full((b, 0), float("-inf"))
        best_i = torch.zeros((b, 0), dtype=torch.long)
        for start in range(0, self.n_items, self.item_chunk):
            end = min(start + self.item_chunk, self.n_items)
            scores = torch.addmm(self.bias[start:end], h, self.weight[start:end].T)
            if exclude is not None and exclude.numel():
                local = exclude.to(torch.long) - start
                # Only the B x L excluded entries are touched (no B x chunk mask).
                rows, cols = torch.nonzero((local >= 0) & (local < end - start), as_tuple=True)
                scores[rows, local[rows, cols]] = float("-inf")
            kk = min(k, end - start)
            s, i = torch.topk(scores, kk, dim=1)
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, i + start], dim=1)
            if best_s.shape[1] > k:
                best_s, pos = torch.topk(best_s, k, dim=1)
                best_i = torch.gather(best_i, 1, pos)
        # Excluded items carry -inf scores: report them as missing (-1), like the FAISS path.
        best_i = best_i.masked_fill(torch.isneginf(best_s), -1)
        return _pad_to_k(best_s, best_i, k)


def _pad_to_k(s: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if s.shape[1] >= k:
        return s[:, :k], i[:, :k]
    b, extra = s.shape[0], k - s.shape[1]
    return (torch.cat([s, torch.full((b, extra), float("-inf"))], 1),
            torch.cat([i, torch.full((b, extra), -1, dtype=torch.long)], 1))


class FaissRetriever:
    """FAISS maximum-inner-product search over augmented item vectors ``[w_j, b_j]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, method: str = "flat",
                 hnsw_m: int = 32, ef_search: int = 128, nlist: int | None = None, nprobe: int = 16,
                 seed: int = 0):
        import faiss  # imported lazily: only retrieval needs it

        self.method = method
        vectors = augment_items(weight, bias)
        self.n_items, dim = vectors.shape
        if method == "flat":
            index = faiss.IndexFlatIP(dim)
        elif method == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        elif method == "ivf":
            nlist = min(nlist or max(1, int(4 * math.sqrt(self.n_items))), self.n_items)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            n_train = min(self.n_items, max(39 * nlist, 10_000))
            index.train(vectors[rng.choice(self.n_items, n_train, replace=False)])
            index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"unknown FAISS method {method!r}; choose flat, hnsw or ivf")
        index.add(vectors)
        self.index = index

    def search(self, h: torch.Tensor, k: int, exclude: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # At most L excluded ids per row, so k + L candidates always leave k valid ones.
        want = min(self.n_items, k + _exclusion_width(exclude))
        d, i = self.index.search(augment_queries(h), want)
        scores = torch.from_numpy(d)
        ids = torch.from_numpy(i).to(torch.long)
        scores = scores.masked_fill(ids < 0, float("-inf"))
        scores, ids = _drop_excluded(scores, ids, None if exclude is None else exclude.to(torch.long), k)
        return _pad_to_k(scores, ids, k)


class AutoRetriever:
    """Exact top-k choosing FAISS flat or dense per request (see module docstring)."""

    method = "auto"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, auto_threshold: int, item_chunk: int):
        self.dense = DenseRetriever(weight, bias, item_chunk=item_chunk)
        self.flat = FaissRetriever(weight, bias, "flat") if weight.shape[0] >= auto_threshold else None
        self.n_items = weight.shape[0]
        self.last_method = None

    def search(self, h: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
        use_flat = self.flat is not None and h.shape[0] < AUTO_MAX_FAISS_BATCH
        self.last_method = "flat" if use_flat else "dense"
        return (self.flat if use_flat else self.dense).search(h, k, exclude)


def build_retriever(weight: torch.Tensor, bias: torch.Tensor | None, method: str = "auto",
                    auto_threshold: int = DEFAULT_AUTO_THRESHOLD, item_chunk: int = 65536, **faiss_kwargs):
    """Return a retriever for an output layer with ``weight`` Float[N, H] and ``bias`` Float[N]."""
    if method not in METHODS:
        raise ValueError(f"unknown retrieval method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "auto":
        return AutoRetriever(weight, bias, auto_threshold, item_chunk)
    if method == "dense":
        return DenseRetriever(weight, bias, item_chunk=item_chunk)
    return FaissRetriever(weight, bias, method=method, **faiss_kwargs)


def measure_recall(approx_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean fraction of the exact top-k ids found in the approximate top-k (recall@k)."""
    hits = (approx_ids[:, :, None] == exact_ids[:, None, :]) & (exact_ids[:, None, :] >= 0)
    found = hits.any(dim=1).sum().item()
    total = (exact_ids >= 0).sum().item()
    return found / max(total, 1)
