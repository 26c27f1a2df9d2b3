"""Synthetic dataset and teacher folders (real schemas, random content) for tests and benchmarks.

``synthetic_dataset(out, n_items, n_train, n_valid, n_test)`` writes a ``dllm2rec.dataset/1``
folder through ``dllm2rec.data.dataset.save_dataset``. Targets follow a learnable rule
(the next item is usually ``last history item + 1``) so a working trainer beats chance.
``synthetic_teacher(out, dataset, top_n, emb_dim)`` writes a ``dllm2rec.teacher/1`` folder whose
rows are stored in SHUFFLED order (readers must align by ``row_id``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_splits(n_items: int, n_train: int, n_valid: int, n_test: int, max_history: int = 10,
                     seed: int = 0, noise: float = 0.3) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    total = n_train + n_valid + n_test
    lengths = rng.integers(1, max_history + 1, size=total)
    lengths[rng.random(total) < 0.6] = max_history
    start = rng.integers(0, n_items, size=total)
    hist = (start[:, None] + np.arange(max_history)[None, :]) % n_items
    hist = np.where(np.arange(max_history)[None, :] < lengths[:, None], hist, n_items).astype(np.int64)
    last = hist[np.arange(total), lengths - 1]
    target = (last + 1) % n_items
    noisy = rng.random(total) < noise
    target[noisy] = rng.integers(0, n_items, size=int(noisy.sum()))
    splits, lo = {}, 0
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        sl = slice(lo, lo + n)
        splits[name] = {
            "row_id": np.arange(lo, lo + n, dtype=np.int64), "user": np.array([f"u{i}" for i in range(lo, lo + n)], dtype=object),
            "history": hist[sl], "history_len": lengths[sl].astype(np.int64), "target": target[sl].astype(np.int64),
            "timestamp": np.arange(lo, lo + n, dtype=np.int64),
        }
        lo += n
    return splits


def synthetic_dataset(out: str | Path, n_items: int = 50, n_train: int = 512, n_valid: int = 128,
                      n_test: int = 128, max_history: int = 10, seed: int = 0) -> Path:
    from dllm2rec.data.dataset import DOMAINS, save_dataset

    titles = [f"Item {i}" for i in range(n_items)]
    save_dataset(out, name="synthetic", titles=titles,
                 splits=synthetic_splits(n_items, n_train, n_valid, n_test, max_history, seed),
                 max_history=max_history, protocol={"kind": "synthetic", "seed": seed}, domain=DOMAINS["games"],
                 sources=[])
    return Path(out)


def synthetic_teacher(out: str | Path, dataset, top_n: int = 20, emb_dim: int = 16, seed: int = 0,
                      emb_dtype: str = "float32", shuffle: bool = True) -> Path:
    """A teacher folder for ``dataset``; candidates include the true target at a random rank."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from dllm2rec.atomic import atomic_dir, write_manifest

    rng = np.random.default_rng(seed)
    n = dataset.n_items
    tr = dataset.splits["train"]
    r = len(tr["target"])
    ids = rng.integers(0, n, size=(r, top_n)).astype(np.int32)
    ids[np.arange(r), rng.integers(0, top_n, size=r)] = tr["target"]
    dist = np.sort(rng.random((r, top_n)).astype(np.float32) * 2 + 0.5, axis=1)
    gt = (rng.random(r).astype(np.float32) + 0.5)
    order = rng.permutation(r) if shuffle else np.arange(r)
    table = pa.table({
        "row_id": pa.array(tr["row_id"][order], pa.int64()),
        "generated": pa.array([f"gen {i}" for i in order], pa.string()),
        "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids[order].reshape(-1), pa.int32()), top_n).cast(pa.list_(pa.int32())),
        "topk_dist": pa.FixedSizeListArray.from_arrays(pa.array(dist[order].reshape(-1), pa.float32()), top_n).cast(pa.list_(pa.float32())),
        "gt_dist": pa.array(gt[order], pa.float32()),
    })
    emb = torch.from_numpy(rng.standard_normal((n, emb_dim)).astype(np.float32)).to(getattr(torch, emb_dtype))
    with atomic_dir(out) as tmp:
        pq.write_table(table, tmp / "rank_train.parquet")
        save_file({"embeddings": emb.contiguous()}, str(tmp / "item_embeddings.safetensors"))
        write_manifest(tmp, {
            "schema": "dllm2rec.teacher/1", "base_model": "synthetic", "adapter": None, "engine": "synthetic",
            "decoding": "none", "pooling": "last", "normalized": False, "distance": "l2", "top_n": top_n,
            "emb_dim": emb_dim, "emb_dtype": emb_dtype, "n_items": n, "id_map_hash": dataset.manifest["id_map_hash"],
            "splits": {"train": r},
        })
    return Path(out)
