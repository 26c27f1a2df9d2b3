"""Teacher knowledge for the student: ONE loader for both teacher folder formats.

``load_teacher(path, dataset) -> TeacherKnowledge`` accepts

- a project teacher folder (schema ``dllm2rec.teacher/1``: ``rank_train.parquet`` with
  ``row_id``/``topk_ids``/``topk_dist``/``gt_dist``, ``item_embeddings.safetensors``,
  ``manifest.json``), or
- a reference-code ``tocf/<name>/`` folder (``myrank_train.txt``, ``confidence_train.txt``,
  ``all_embeddings.pt``). It has no ``gt_dist`` (the paper's confidence variant is then
  unavailable) and, unless it was exported by this project (``manifest.json`` with
  ``id_map_hash``), no id-table hash (the id table cannot be cross-checked; rows are matched
  to the dataset's training rows in ``row_id`` order, which is the reference ``train_data.df``
  index order for a dataset imported from the reference format).

Validation (``KnowledgeError`` naming the file, the row and the problem): the teacher covers
exactly the dataset's training rows (aligned by ``row_id``, never by position in the file), ids
lie in ``0..N-1``, every row has the same width, distances and embeddings are finite, the
embedding table has N rows, and the ``id_map_hash`` equals the dataset's.

The returned arrays are indexed by POSITION IN THE DATASET'S TRAIN SPLIT (row i of
``topk_ids`` belongs to ``dataset.splits["train"]`` row i). The embedding table is a frozen
tensor [N, d] (float16 or float32, as stored); it is gathered per batch outside the model's
parameters (``dllm2rec.train.batches`` / the model's ``llm_table`` input, where the padding id N gives
zeros) and never becomes a parameter, so it is neither trained, all-reduced nor checkpointed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dllm2rec.atomic import read_manifest
from dllm2rec.errors import DataError, ManifestError
from dllm2rec.readers import read_parquet, read_safetensors

TEACHER_SCHEMA = "dllm2rec.teacher/1"


class KnowledgeError(DataError):
    """Teacher knowledge does not match the dataset (row count, ids, width, NaN, id table)."""


@dataclass
class TeacherKnowledge:
    """Teacher outputs aligned to the dataset's training split.

    topk_ids: int64 [R_train, top_n], nearest first. topk_dist: float32 [R_train, top_n],
    ascending un-squared L2. gt_dist: float32 [R_train] or None (reference tocf folders).
    embeddings: torch [N, d] (float16 or float32), frozen.
    """

    source: str  # "project" | "reference"
    path: str
    topk_ids: np.ndarray
    topk_dist: np.ndarray
    gt_dist: np.ndarray | None
    embeddings: torch.Tensor
    id_map_hash: str | None
    notes: list[str] = field(default_factory=list)
    # bool [R_train] when the teacher covers only a subset of training rows (distill.min_coverage
    # < 1); uncovered rows hold placeholder candidates and must get zero RD weight.
    covered: np.ndarray | None = None

    @property
    def top_n(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def emb_dim(self) -> int:
        return int(self.embeddings.shape[1])


def _train_row_ids(dataset) -> np.ndarray:
    return np.asarray(dataset.splits["train"]["row_id"], dtype=np.int64)


def _n_items(dataset) -> int:
    n = getattr(dataset, "n_items", None)
    return int(n if n is not None else dataset.manifest["n_items"])


def align_rows(file: str, row_ids: np.ndarray, train_row_ids: np.ndarray, min_coverage: float = 1.0) -> np.ndarray:
    """Return ``perm`` with ``row_ids[perm[i]] == train_row_ids[i]``; refuse missing/extra/duplicate ids.

    With ``min_coverage < 1`` a teacher file may cover a subset of the training rows (at least that
    share); ``perm[i] == -1`` marks a training row without teacher output. Unknown row ids are
    always refused."""
    if min_coverage < 1.0:
        return _align_subset(file, row_ids, train_row_ids, min_coverage)
    if len(row_ids) != len(train_row_ids):
        raise KnowledgeError(
            file, f"has {len(row_ids)} rows but the dataset has {len(train_row_ids)} training rows"
        )
    order = np.argsort(row_ids, kind="stable")
    sorted_ids = row_ids[order]
    dup = np.nonzero(sorted_ids[1:] == sorted_ids[:-1])[0]
    if len(dup):
        raise KnowledgeError(file, f"row_id {int(sorted_ids[dup[0]])} appears more than once", row=int(order[dup[0] + 1]))
    pos = np.searchsorted(sorted_ids, train_row_ids)
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    missing = np.nonzero(sorted_ids[pos] != train_row_ids)[0]
    if len(missing):
        raise KnowledgeError(
            file, f"training row_id {int(train_row_ids[missing[0]])} has no teacher row "
            f"({len(missing)} training rows missing; is this teacher for another dataset or split?)"
        )
    return order[pos]


def _align_subset(file: str, row_ids: np.ndarray, train_row_ids: np.ndarray, min_coverage: float) -> np.ndarray:
    order = np.argsort(train_row_ids, kind="stable")
    sorted_train = train_row_ids[order]
    pos = np.clip(np.searchsorted(sorted_train, row_ids), 0, max(len(sorted_train) - 1, 0))
    unknown = np.nonzero(sorted_train[pos] != row_ids)[0] if len(sorted_train) else np.arange(len(row_ids))
    if len(unknown):
        raise KnowledgeError(file, f"row_id {int(row_ids[unknown[0]])} is not a training row of this dataset",
                             row=int(unknown[0]))
    perm = np.full(len(train_row_ids), -1, dtype=np.int64)
    target = order[pos]
    if len(np.unique(target)) != len(target):
        raise KnowledgeError(file, "a row_id appears more than once")
    perm[target] = np.arange(len(row_ids))
    share = len(row_ids) / max(len(train_row_ids), 1)
    if share < min_coverage:
        raise KnowledgeError(file, f"covers {len(row_ids)} of {len(train_row_ids)} training rows ({share:.1%}), "
                             f"below distill.min_coverage={min_coverage}")
    return perm


def _expand(values: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Rows of ``values`` in training-row order; rows with ``perm == -1`` get zeros (placeholders)."""
    out = np.zeros((len(perm),) + values.shape[1:], dtype=values.dtype)
    ok = perm >= 0
    out[ok] = values[perm[ok]]
    return out


def _check_ids(file: str, ids: np.ndarray, n_items: int) -> None:
    bad = np.nonzero((ids < 0) | (ids >= n_items))
    if len(bad[0]):
        r, c = int(bad[0][0]), int(bad[1][0])
        raise KnowledgeError(file, f"item id {int(ids[r, c])} at position {c} is outside 0..{n_items - 1}", row=r)


def _check_finite(file: str, values: np.ndarray, what: str) -> None:
    bad = np.nonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0]
    if len(bad):
        raise KnowledgeError(file, f"{what} is NaN or infinite", row=int(bad[0]))


def _check_ranking_order(file: str, dist: np.ndarray) -> None:
    """Each row's distances must be ascending (nearest first): a reversed or shuffled list would
    silently turn RD's position weights upside down."""
    bad = np.nonzero((np.diff(dist, axis=1) < 0).any(axis=1))[0] if dist.shape[1] > 1 else []
    if len(bad):
        raise KnowledgeError(file, "topk_dist is not ascending (the list is not in ranking order, nearest first)",
                             row=int(bad[0]))


def _check_embeddings(file: str, emb: torch.Tensor, n_items: int) -> torch.Tensor:
    if emb.ndim != 2:
        raise KnowledgeError(file, f"embedding table must be 2-D [N, d], got shape {tuple(emb.shape)}")
    if emb.shape[0] != n_items:
        raise KnowledgeError(file, f"embedding table has {emb.shape[0]} rows but the dataset has {n_items} items")
    if emb.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        emb = emb.float()
    for start in range(0, emb.shape[0], 4096):  # chunked: never a second full-size copy
        ok = torch.isfinite(emb[start:start + 4096]).all(dim=1)
        if not bool(ok.all()):
            raise KnowledgeError(file, "embedding is NaN or infinite", row=start + int((~ok).nonzero()[0, 0]))
    return emb.contiguous()


def _list_column(file: str, table, name: str, dtype) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in table.column_names:
        raise KnowledgeError(file, f"missing column {name!r} (have {table.column_names})")
    col = table.column(name).combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type) and not pa.types.is_fixed_size_list(col.type):
        raise KnowledgeError(file, f"column {name!r} must be a list column, got {col.type}")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        r = int(np.nonzero(lengths != lengths[0])[0][0])
        raise KnowledgeError(file, f"column {name!r} has {lengths[r]} entries, expected {lengths[0]} like row 0", row=r)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(dtype)
    width = int(lengths[0]) if len(lengths) else 0
    return flat.reshape(len(lengths), width)


def _load_project(folder: Path, dataset, min_coverage: float = 1.0) -> TeacherKnowledge:
    manifest = read_manifest(folder, TEACHER_SCHEMA)
    n_items = _n_items(dataset)
    want = dataset.manifest.get("id_map_hash")
    if manifest.get("id_map_hash") != want:
        raise ManifestError(
            f"{folder / 'manifest.json'}: id_map_hash {manifest.get('id_map_hash')!r} differs from the "
            f"dataset's {want!r}: the teacher was built on another item id table"
        )
    if int(manifest.get("n_items", -1)) != n_items:
        raise ManifestError(f"{folder / 'manifest.json'}: n_items {manifest.get('n_items')} != dataset n_items {n_items}")
    rank_file = folder / "rank_train.parquet"
    if not rank_file.is_file():
        raise KnowledgeError(rank_file, "not found (run the teacher's train-split phases and 'teacher merge')")
    table = read_parquet(rank_file)
    f = str(rank_file)
    for col in ("row_id", "topk_ids", "topk_dist"):
        if col not in table.column_names:
            raise KnowledgeError(f, f"missing column {col!r} (have {table.column_names})")
    row_ids = table.column("row_id").to_numpy().astype(np.int64)
    perm = align_rows(f, row_ids, _train_row_ids(dataset), min_coverage)
    ids = _list_column(f, table, "topk_ids", np.int64)
    dist = _list_column(f, table, "topk_dist", np.float32)
    if ids.shape != dist.shape:
        raise KnowledgeError(f, f"topk_ids width {ids.shape[1]} != topk_dist width {dist.shape[1]}")
    _check_ids(f, ids, n_items)
    _check_finite(f, dist, "topk_dist")
    _check_ranking_order(f, dist)
    gt = None
    if "gt_dist" in table.column_names:
        gt = table.column("gt_dist").to_numpy().astype(np.float32)
        _check_finite(f, gt, "gt_dist")
        gt = _expand(gt, perm)
    emb_file = folder / "item_embeddings.safetensors"
    if not emb_file.is_file():
        raise KnowledgeError(emb_file, "not found")
    tensors = read_safetensors(emb_file)
    if "embeddings" not in tensors:
        raise KnowledgeError(emb_file, f"no tensor named 'embeddings' (have {sorted(tensors)})")
    emb = _check_embeddings(str(emb_file), tensors["embeddings"], n_items)
    if manifest.get("emb_dim") is not None and int(manifest["emb_dim"]) != emb.shape[1]:
        raise KnowledgeError(emb_file, f"embedding width {emb.shape[1]} != manifest emb_dim {manifest['emb_dim']}")
    if manifest.get("top_n") is not None and int(manifest["top_n"]) != ids.shape[1]:
        raise KnowledgeError(f, f"topk_ids width {ids.shape[1]} != manifest top_n {manifest['top_n']}")
    notes = [] if gt is not None else ["rank_train.parquet has no gt_dist: the paper RD variant is unavailable"]
    covered = None
    if (perm < 0).any():
        covered = perm >= 0
        notes.append(f"teacher covers {int(covered.sum())} of {len(perm)} training rows; the others get no RD")
    return TeacherKnowledge("project", str(folder), _expand(ids, perm), _expand(dist, perm), gt, emb, want, notes,
                            covered)


def _load_reference(folder: Path, dataset) -> TeacherKnowledge:
    """Reference ``tocf/`` folder, read and validated by ``dllm2rec.data.reference.read_tocf``."""
    from dllm2rec.data.reference import TOCF_SCHEMA, read_tocf

    n_items = _n_items(dataset)
    want = dataset.manifest.get("id_map_hash")
    train_ids = _train_row_ids(dataset)
    ids, dist, emb = read_tocf(folder, len(train_ids), n_items=n_items, expected_id_map_hash=want)
    emb = _check_embeddings(str(folder / "all_embeddings.pt"), emb, n_items)
    # Line r belongs to train_data.df index label r == the r-th training row in row_id order.
    order = np.argsort(train_ids, kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    notes = ["reference tocf folder: no gt_dist, the paper RD variant is unavailable"]
    checked = None
    if (folder / "manifest.json").is_file() and read_manifest(folder, TOCF_SCHEMA).get("id_map_hash") == want:
        checked = want
    else:
        notes.append("reference tocf folder without a manifest: the item id table could not be cross-checked "
                     "(only row count, id range and embedding rows were)")
    return TeacherKnowledge("reference", str(folder), ids[inv], dist.astype(np.float32)[inv], None, emb, checked, notes)


def load_teacher(path: str | Path, dataset, min_coverage: float = 1.0) -> TeacherKnowledge:
    """Load and validate teacher knowledge for ``dataset`` (see module docstring).

    ``min_coverage`` (``distill.min_coverage``): share of training rows that must have teacher
    output; below 1 a project teacher folder may cover a subset (``TeacherKnowledge.covered``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise KnowledgeError(folder, "teacher folder not found")
    if (folder / "myrank_train.txt").is_file():
        return _load_reference(folder, dataset)
    if (folder / "manifest.json").is_file() or (folder / "rank_train.parquet").is_file():
        return _load_project(folder, dataset, min_coverage)
    raise KnowledgeError(
        folder, "neither a teacher folder (manifest.json, rank_train.parquet) nor a reference tocf folder (myrank_train.txt)"
    )
