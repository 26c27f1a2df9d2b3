"""Teacher inputs and outputs: dataset rows -> prompts, part-file IO, the merged teacher folder.

- ``load_teacher_data(path, limit=0) -> TeacherData``: the dataset folder through
  ``dllm2rec.data.dataset.load_dataset`` (validated there), plus the prompt ``Domain`` from its
  manifest; ``limit > 0`` keeps the first ``limit`` rows of every split (smoke runs).
- ``merge(cfg)``: joins the finished shards of every phase into the teacher folder
  (schema ``dllm2rec.teacher/1``, docs/ARCHITECTURE.md): ``rank_<split>.parquet``,
  ``item_embeddings.safetensors``, ``manifest.json`` (last; ``query`` says what rows were grounded
  from, ``teacher.query``; a history-query teacher has no ``generated`` column; ``diversity`` per
  split: ``output_diversity``). Every dataset row must appear in exactly one shard; anything else
  raises ``ShardError`` naming the split and row ids.
- ``output_diversity(generated, topk_ids)`` -> ``{"rows", "distinct_generated" (None without
  texts), "distinct_top1"}``: how varied the teacher's answers are (a collapsed fine-tune writes
  a handful of titles for every row; ``dllm2rec analyze teacher`` gives the fuller profile).
- ``export_tocf(teacher_dir, out_dir, top_n)``: the reference-code ``tocf/<name>/`` files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllm2rec.atomic import atomic_path, read_manifest, write_manifest
from dllm2rec.errors import DataError
from dllm2rec.eval.metrics import metrics_from_ranks
from teacher.config import split_limits
from teacher.fingerprints import embed_fingerprint, generate_fingerprint, ground_fingerprint
from teacher.prompts import Domain, build_prompt
from teacher.query import describe as describe_query, is_history
from teacher.shards import ShardError, finished_parts

SCHEMA = "dllm2rec.teacher/1"


@dataclass
class TeacherData:
    path: Path
    titles: list[str]
    splits: dict[str, dict[str, np.ndarray]]
    domain: Domain
    id_map_hash: str
    manifest: dict

    @property
    def n_items(self) -> int:
        return len(self.titles)


def load_teacher_data(path: str | Path, limit: int | dict[str, int] = 0) -> TeacherData:
    """``limit``: rows kept per split (one int for all, or ``{split: n}``; 0 = all)."""
    from dllm2rec.data.dataset import load_dataset

    ds = load_dataset(path)
    domain = Domain.from_manifest(ds.manifest, source=f"{path}/manifest.json")
    splits = ds.splits
    limits = limit if isinstance(limit, dict) else {s: limit for s in splits}
    splits = {s: ({k: v[: limits[s]] for k, v in cols.items()} if limits.get(s) else cols)
              for s, cols in splits.items()}
    return TeacherData(Path(path), ds.titles, splits, domain, ds.id_map_hash, ds.manifest)


def split_prompts(data: TeacherData, split: str, rows: slice = slice(None)) -> list[str]:
    """BIGRec prompt of every row of ``split`` (or of the block ``rows``), in row order."""
    cols = data.splits[split]
    return [
        build_prompt([data.titles[i] for i in hist[:n]], data.domain)
        for hist, n in zip(cols["history"][rows], cols["history_len"][rows])
    ]


def work_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "work"


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_tensors(tensors: dict, path: Path) -> None:
    """safetensors file from numpy arrays / torch tensors, written atomically."""
    import torch
    from safetensors.torch import save_file

    as_torch = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True, order="C"))) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(as_torch, str(tmp))


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DataError(path, f"unreadable safetensors file: {exc}") from exc


def gather_item_embeddings(work: Path, fp: str, n_items: int) -> np.ndarray:
    """[N, d] float32 from the finished ``embed/items`` shards; every item exactly once."""
    parts = finished_parts(work, "embed", "items", fp)
    ids, embs = [], []
    for p in parts:
        t = read_tensors(p.path("safetensors"))
        if len(t["ids"]) == 0:
            continue
        ids.append(t["ids"])
        embs.append(t["embeddings"])
    ids_all = np.concatenate(ids)
    if not np.array_equal(np.sort(ids_all), np.arange(n_items)):
        raise ShardError(f"{work}/embed/items: shards cover {len(ids_all)} ids, expected each of 0..{n_items - 1} once")
    out = np.empty((n_items, embs[0].shape[1]), np.float32)
    out[ids_all] = np.concatenate(embs).astype(np.float32)
    return out


def _concat_parts(work: Path, phase: str, split: str, fp: str, expected: np.ndarray):
    """Concatenate a phase's parquet shards; check the row ids equal ``expected`` exactly once."""
    import pyarrow as pa

    from dllm2rec.readers import read_parquet

    table = pa.concat_tables([read_parquet(p.path("parquet")) for p in finished_parts(work, phase, split, fp)])
    ids = table.column("row_id").to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    missing = np.setdiff1d(expected, ids)
    extra = np.setdiff1d(ids, expected)
    if len(dup) or len(missing) or len(extra):
        raise ShardError(
            f"{work}/{phase}/{split}: row ids do not match the dataset: duplicated {dup[:5].tolist()}, "
            f"missing {missing[:5].tolist()}, unexpected {extra[:5].tolist()}"
        )
    return table.take(pa.array(np.argsort(ids, kind="stable")))


def output_diversity(generated, topk_ids) -> dict:
    """Distinct generated texts / top-1 items over the rows. ``generated``: pyarrow string
    array or None; ``topk_ids``: pyarrow list<int> array, one list per row (best first)."""
    import pyarrow.compute as pc

    top1 = pc.list_element(topk_ids, 0) if len(topk_ids) else topk_ids
    return {"rows": len(topk_ids),
            "distinct_generated": None if generated is None else int(pc.count_distinct(generated).as_py()),
            "distinct_top1": int(pc.count_distinct(top1).as_py()) if len(topk_ids) else 0}


def merge(cfg) -> dict:
    """Write the final teacher folder from finished shards; returns its manifest."""
    import pyarrow as pa


    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    work = work_dir(cfg)
    out = Path(cfg.output_dir)
    # readers must never pair a new rank file with an old complete manifest
    (out / "manifest.json").unlink(missing_ok=True)
    gfp, efp, rfp = generate_fingerprint(cfg, data), embed_fingerprint(cfg, data), ground_fingerprint(cfg, data)
    items = gather_item_embeddings(work, efp, data.n_items)
    counts, metrics, diversity = {}, {}, {}
    history = is_history(cfg)
    for split in cfg.splits:
        expected = np.sort(data.splits[split]["row_id"])
        grd = _concat_parts(work, "ground", split, rfp, expected)
        # a history-query teacher generated nothing: no `generated` column (a ranking-only teacher)
        gen = {} if history else {"generated": _concat_parts(work, "generate", split, gfp, expected).column("generated")}
        table = pa.table({
            "row_id": grd.column("row_id"),
            **gen,
            "topk_ids": grd.column("topk_ids"),
            "topk_dist": grd.column("topk_dist"),
            "gt_dist": grd.column("gt_dist"),
            "target_rank": grd.column("target_rank"),
        })
        write_parquet(table, out / f"rank_{split}.parquet")
        counts[split] = table.num_rows
        metrics[split] = metrics_from_ranks(grd.column("target_rank").to_numpy(), cfg.ground.ks)
        diversity[split] = output_diversity(gen.get("generated"), grd.column("topk_ids"))
    store = np.float16 if cfg.embed.store_dtype == "float16" else np.float32
    write_tensors({"embeddings": items.astype(store)}, out / "item_embeddings.safetensors")
    manifest = {
        "schema": SCHEMA,
        "base_model": cfg.model.base,
        "adapter": cfg.model.adapter or None,
        "engine": {"generate": "none" if history else cfg.generate.engine, "embed": cfg.embed.engine, "dtype": cfg.model.dtype},
        "decoding": None if history else {
            "mode": cfg.generate.decoding, "beam_width": cfg.generate.beam_width if cfg.generate.decoding == "beam" else 1,
            "max_new_tokens": cfg.generate.max_new_tokens},
        # what each row was grounded from: BIGRec's generated title or the history items (teacher/query.py)
        "query": describe_query(cfg),
        "pooling": "mean" if cfg.embed.engine == "sentence" else "last",
        "normalized": cfg.embed.engine == "sentence",
        "embed_model": cfg.embed.model if cfg.embed.engine == "sentence" else cfg.model.base,
        "distance": "l2",
        "index": cfg.ground.index,
        # True when the ranking uses collaborative statistics of the training split (teacher/collab.py)
        "collaborative": cfg.ground.collab != "none",
        "collab": None if cfg.ground.collab == "none" else {
            "kind": cfg.ground.collab, "gamma": cfg.ground.gamma, "dim": cfg.ground.collab_dim,
            "neighbours": cfg.ground.collab_neighbours, "distance": "l2 * (1 + collab) ** -gamma"},
        "top_n": cfg.ground.top_n,
        "emb_dim": int(items.shape[1]),
        "emb_dtype": cfg.embed.store_dtype,
        "n_items": data.n_items,
        "id_map_hash": data.id_map_hash,
        "dataset": str(data.path),
        "splits": counts,
        "limit": split_limits(cfg),
        "metrics": metrics,
        "diversity": diversity,
    }
    write_manifest(out, {"schema": SCHEMA, **manifest})
    return manifest


def read_rank_table(teacher_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """Arrays of ``rank_<split>.parquet`` sorted by row_id (topk as [R, top_n])."""
    from dllm2rec.readers import read_parquet

    p = Path(teacher_dir) / f"rank_{split}.parquet"
    if not p.is_file():
        raise DataError(p, "missing; run `teacher merge` for this split")
    t = read_parquet(p)
    return {
        "row_id": t.column("row_id").to_numpy(),
        "topk_ids": np.asarray(t.column("topk_ids").to_pylist(), dtype=np.int64),
        "topk_dist": np.asarray(t.column("topk_dist").to_pylist(), dtype=np.float32),
        "gt_dist": t.column("gt_dist").to_numpy(),
    }


def export_tocf(teacher_dir: str | Path, out_dir: str | Path, top_n: int | None = None) -> Path:
    """Reference ``tocf`` files: all_embeddings.pt, myrank_train.txt, confidence_train.txt.

    Line r of the text files belongs to the r-th training row in row_id order (= the index label
    of the reference ``train_data.df`` for datasets in the reference order). Written by the data
    side's ``dllm2rec.data.reference.write_tocf`` (one tocf writer in the project).
    """
    from dllm2rec.data.reference import write_tocf

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    manifest = read_manifest(teacher_dir, SCHEMA)
    rank = read_rank_table(teacher_dir, "train")
    n = top_n or rank["topk_ids"].shape[1]
    if not 0 < n <= rank["topk_ids"].shape[1]:
        raise DataError(teacher_dir / "rank_train.parquet", f"has top_n {rank['topk_ids'].shape[1]}, requested {n}")
    emb = read_tensors(teacher_dir / "item_embeddings.safetensors")["embeddings"]
    if emb.shape[0] != manifest["n_items"]:
        raise DataError(teacher_dir / "item_embeddings.safetensors", f"{emb.shape[0]} rows, manifest n_items {manifest['n_items']}")
    write_tocf(out_dir, emb.astype(np.float32), rank["topk_ids"][:, :n], rank["topk_dist"][:, :n],
               id_map_hash_=manifest["id_map_hash"])
    return out_dir
