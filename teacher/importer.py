"""``python -m teacher import``: bring your own teacher's rankings as a teacher folder.

``python -m teacher import --rankings FILE --score-kind distance|similarity|logit|logprob
--dataset D --out T [--item-embeddings FILE] [--min-top-n 10]``

Rankings file (README "Distil from your own teacher"): Parquet, or JSON lines (``.jsonl`` /
``.json``), one record per dataset row the teacher covers (any split; ``row_id`` says which):
``row_id`` int (the dataset's row id), ``topk_ids`` list of item ids (best first), ``topk_scores``
list of numbers (same length, sorted best first for the declared kind), optional ``gt_score``
(the teacher's score of the row's true item), optional ``target_rank`` (the exact 1-based rank
of the true item among all N items; with it the folder's metrics are exact for every K, as
``from-run``'s are). Every list has the same length. Item embeddings:
safetensors (tensor ``embeddings``, or the file's only tensor) or ``.npy`` (read with
``allow_pickle=False``), [n_items, d]. ``--item-embeddings`` is required: every teacher folder
carries the item table (ED reads it), and no stand-in table is made up.

Validation and the score-kind mapping live in ``teacher/folder.py`` (shared with ``from-run``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dllm2rec.data.jsonl import json_objects
from dllm2rec.errors import DataError
from teacher.folder import check_kind, check_rankings, write_teacher_folder

REQUIRED = ("row_id", "topk_ids", "topk_scores")


def _stack(file: Path, name: str, lists: list) -> np.ndarray:
    """list of per-row lists -> [R, n]; ragged lists are a DataError naming the row."""
    if not lists:
        return np.zeros((0, 0))
    width = len(lists[0]) if isinstance(lists[0], (list, tuple, np.ndarray)) else -1
    for r, v in enumerate(lists):
        if not isinstance(v, (list, tuple, np.ndarray)):
            raise DataError(file, f"{name} must be a list, got {type(v).__name__}", row=r)
        if len(v) != width:
            raise DataError(file, f"{name} has {len(v)} entries, expected {width} like row 0 (ragged lists)", row=r)
    try:
        return np.asarray(lists, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(file, f"{name} holds non-numeric values ({exc})") from exc


def read_rankings(path: str | Path) -> dict[str, object]:
    """Columns of a Parquet / JSON-lines rankings file, in file order (no semantic checks)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "rankings file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(path, f"unreadable Parquet file: {exc}") from exc
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
    elif path.suffix in (".jsonl", ".json"):
        records = [rec for _, rec in json_objects(path, "a JSON object with row_id, topk_ids, topk_scores")]
        keys = set().union(*records) if records else set(REQUIRED)
        for r, rec in enumerate(records):
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                raise DataError(path, f"missing field(s) {missing}", row=r)
        cols = {k: [rec.get(k) for rec in records] for k in keys}
    else:
        raise DataError(path, "unknown rankings format; use .parquet or .jsonl")
    missing = [k for k in REQUIRED if k not in cols]
    if missing:
        raise DataError(path, f"missing column(s) {missing} (have {sorted(cols)})")
    out: dict[str, object] = {}
    try:
        out["row_id"] = np.asarray(cols["row_id"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"row_id must be integers ({exc})") from exc
    ids = _stack(path, "topk_ids", cols["topk_ids"])
    scores = _stack(path, "topk_scores", cols["topk_scores"])
    if ids.shape[1:] != scores.shape[1:]:
        raise DataError(path, f"topk_ids have {ids.shape[1]} entries but topk_scores {scores.shape[1]} (ragged lists)", row=0)
    if ids.size and not np.array_equal(ids, np.round(ids)):
        raise DataError(path, "topk_ids must be integers", row=int(np.nonzero((ids != np.round(ids)).any(1))[0][0]))
    out["topk_ids"] = ids.astype(np.int64)
    out["topk_scores"] = scores
    if "gt_score" in cols:
        gt = cols["gt_score"]
        if any(v is None for v in gt):
            raise DataError(path, "gt_score is given for some rows but not all", row=gt.index(None))
        out["gt_score"] = np.asarray(gt, dtype=np.float64)
    if "target_rank" in cols:
        tr = cols["target_rank"]
        if any(v is None for v in tr):
            raise DataError(path, "target_rank is given for some rows but not all", row=tr.index(None))
        bad = [r for r, v in enumerate(tr) if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
        if bad:
            raise DataError(path, f"target_rank must be an integer, got {tr[bad[0]]!r}", row=bad[0])
        out["target_rank"] = np.asarray(tr, dtype=np.int64)
    return out


def read_embeddings(path: str | Path) -> np.ndarray:
    """[N, d] from safetensors (``embeddings`` or the only tensor) or ``.npy`` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "item embeddings file not found")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise DataError(path, f"unreadable .npy (object arrays / pickles are refused): {exc}") from exc
    if path.suffix == ".safetensors":
        from teacher.artifacts import read_tensors

        tensors = read_tensors(path)
        if "embeddings" in tensors:
            return tensors["embeddings"]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise DataError(path, f"no tensor named 'embeddings' and several tensors ({sorted(tensors)})")
    raise DataError(path, "unknown embeddings format; use .safetensors or .npy")


def import_rankings(rankings: str | Path, kind: str | None, dataset: str | Path, out: str | Path,
                    item_embeddings: str | Path | None, min_top_n: int = 10,
                    source: dict | None = None) -> dict:
    """Validate the files against ``dataset`` and write the teacher folder ``out`` -> manifest.

    ``source``: extra provenance for the manifest's ``source`` (e.g. the RecBole model and seed).
    """
    from dllm2rec.data.dataset import load_dataset

    check_kind(kind)
    if item_embeddings is None:
        raise DataError(rankings, "--item-embeddings is required: the teacher folder carries the item table ED uses")
    ds = load_dataset(dataset)
    cols = read_rankings(rankings)
    emb = read_embeddings(item_embeddings)
    by_split = check_rankings(rankings, cols["row_id"], cols["topk_ids"], cols["topk_scores"], kind, ds,
                              min_top_n, cols.get("gt_score"), cols.get("target_rank"))
    source = {**(source or {}), "kind": "import", "rankings": str(rankings),
              "embeddings_file": str(item_embeddings)}
    return write_teacher_folder(out, ds, by_split, kind, emb, source)
