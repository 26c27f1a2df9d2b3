"""Stages of ``bench pipeline`` that have no project command of their own; each runs as
``python -m dllm2rec.bench.pipeline_stages <stage> ...`` in its own process (so that its wall time
and peak RSS are its own).

- ``generate``: the skewed synthetic log (``dllm2rec.bench.synthlog.write_log``).
- ``teacher``: a teacher folder (schema ``dllm2rec.teacher/1``) for a dataset from RANDOM LLM
  vectors: item embeddings ~ N(0, 1) [N, dim]; the "generated text" embedding of train row r is its
  target's embedding plus N(0, noise^2) noise. Grounding = FAISS top-``top_n`` by L2 (exact
  ``IndexFlatL2`` up to ``FLAT_MAX_ITEMS`` items, ``IndexIVFFlat`` above: nlist = 4 sqrt(N) capped at
  ``IVF_MAX_LISTS``, nprobe ``IVF_NPROBE``), queries in chunks; ``rank_train.parquet`` is written
  chunk by chunk (``pyarrow.parquet.ParquetWriter``), so memory is O(N x dim + chunk), not O(rows).
  Only the train split is grounded (what the student reads); the teacher's own full-ranking
  ``target_rank`` is not computed (it is an exact pass over all items per row).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

FLAT_MAX_ITEMS = 50_000
IVF_MAX_LISTS = 2048  # k-means cost grows with lists x training points; 64 points per list are used
IVF_NPROBE = 8
_CHUNK = 65536


def _ivf(items: np.ndarray, nlist: int, nprobe: int):
    """A trained, empty ``IndexIVFFlat`` (L2; FAISS keeps the quantizer alive). k-means runs on a
    seeded subsample of 64 points per list (FAISS's default is 256: 4x the training time)."""
    import faiss

    quantizer = faiss.IndexFlatL2(items.shape[1])
    idx = faiss.IndexIVFFlat(quantizer, items.shape[1], nlist, faiss.METRIC_L2)
    idx.cp.max_points_per_centroid = 64
    idx.train(items)
    idx.nprobe = nprobe
    return idx


def random_teacher(dataset: str | Path, out: str | Path, dim: int = 64, top_n: int = 20, seed: int = 0,
                   noise: float = 1.0, index: str = "auto") -> dict:
    """Write the teacher folder ``out`` for the dataset folder ``dataset``; returns its manifest.
    ``index``: "auto" (flat up to ``FLAT_MAX_ITEMS`` items, else ivf), "flat" or "ivf"."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest
    from dllm2rec.data.dataset import SCHEMA, split_columns
    manifest = read_manifest(Path(dataset), SCHEMA)
    n = int(manifest["n_items"])
    train = split_columns(dataset, "train", ["row_id", "target"])
    rng = np.random.default_rng([int(seed), 0x7EAC])
    items = rng.standard_normal((n, dim), dtype=np.float32)
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    if index not in ("auto", "flat", "ivf"):
        raise ValueError(f"index must be auto, flat or ivf, got {index!r}")
    index = ("flat" if n <= FLAT_MAX_ITEMS else "ivf") if index == "auto" else index
    idx = faiss.IndexFlatL2(dim) if index == "flat" else _ivf(items, min(IVF_MAX_LISTS, int(4 * math.sqrt(n))), IVF_NPROBE)
    idx.add(items)
    build_s = time.perf_counter() - t0
    rows = len(train["row_id"])
    list_type = {"ids": pa.list_(pa.int32()), "dist": pa.list_(pa.float32())}
    schema = pa.schema([("row_id", pa.int64()), ("generated", pa.string()), ("topk_ids", list_type["ids"]),
                        ("topk_dist", list_type["dist"]), ("gt_dist", pa.float32())])
    with atomic_dir(out) as tmp:
        with pq.ParquetWriter(tmp / "rank_train.parquet", schema) as writer:
            for r0 in range(0, rows, _CHUNK):
                tgt = train["target"][r0:r0 + _CHUNK]
                q = items[tgt] + noise * rng.standard_normal((len(tgt), dim), dtype=np.float32)
                d2, ids = idx.search(q, top_n)
                gt = np.sqrt(np.square(q - items[tgt]).sum(1))
                offsets = pa.array(np.arange(len(tgt) + 1, dtype=np.int32) * top_n)
                writer.write_table(pa.table({
                    "row_id": pa.array(train["row_id"][r0:r0 + _CHUNK]), "generated": pa.array([""] * len(tgt)),
                    "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int32).reshape(-1))),
                    "topk_dist": pa.ListArray.from_arrays(offsets, pa.array(np.sqrt(np.maximum(d2, 0)).reshape(-1))),
                    "gt_dist": pa.array(gt.astype(np.float32)),
                }, schema=schema))
        save_file({"embeddings": torch.from_numpy(items).half()}, str(tmp / "item_embeddings.safetensors"))
        info = {"schema": "dllm2rec.teacher/1", "base_model": "random vectors (bench pipeline)", "adapter": None,
                "engine": "synthetic", "decoding": "none", "pooling": "last", "normalized": False, "distance": "l2",
                "index": index, "top_n": top_n, "emb_dim": dim, "emb_dtype": "float16", "n_items": n,
                "id_map_hash": manifest["id_map_hash"], "dataset": str(dataset), "splits": {"train": rows},
                "index_build_seconds": round(build_s, 2)}
        write_manifest(tmp, info)
    return info


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m dllm2rec.bench.pipeline_stages")
    sub = parser.add_subparsers(dest="stage", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", required=True)
    g.add_argument("--interactions", type=int, required=True)
    g.add_argument("--items", type=int, required=True)
    g.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("teacher")
    t.add_argument("--dataset", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--dim", type=int, default=64)
    t.add_argument("--top-n", type=int, default=20)
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.stage == "generate":
        from dllm2rec.bench.synthlog import write_log

        info = write_log(args.out, args.interactions, args.items, seed=args.seed)
    else:
        info = random_teacher(args.dataset, args.out, dim=args.dim, top_n=args.top_n, seed=args.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
