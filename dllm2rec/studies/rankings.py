"""Top-k lists of a teacher folder and of a student run over one split, aligned by row.

Shared by ``analyze`` (overlap diagnostics), ``teacher_profile`` and ``latency``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dllm2rec.errors import ConfigError, DataError


def teacher_topk(teacher: str | Path, split: str, row_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions into ``row_ids`` covered by the teacher, teacher top-k Long[R', k] in that order)."""
    import pyarrow.compute as pc

    from dllm2rec.readers import read_parquet

    f = Path(teacher) / f"rank_{split}.parquet"
    if not f.is_file():
        have = sorted(p.name for p in Path(teacher).glob("rank_*.parquet")) if Path(teacher).is_dir() else []
        raise DataError(f, f"not found: the teacher folder has no {split} ranking (has {have or 'none'}); "
                           f"run the teacher on the {split} split (teacher config 'splits') and 'teacher merge'")
    table = read_parquet(f, columns=["row_id", "topk_ids"])
    col = table.column("topk_ids").combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.min() < k:
        raise DataError(f, f"topk_ids has only {int(lengths.min())} entries, fewer than k = {k}",
                        row=int(np.argmin(lengths)))
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    width = int(lengths[0]) if len(lengths) else k
    if len(lengths) and (lengths != width).any():
        raise DataError(f, "topk_ids rows have different widths", row=int(np.nonzero(lengths != width)[0][0]))
    ids = flat.reshape(len(lengths), width)[:, :k]
    dup = np.nonzero((np.sort(ids, 1)[:, 1:] == np.sort(ids, 1)[:, :-1]).any(1))[0]
    if len(dup):
        raise DataError(f, "topk_ids repeats an item", row=int(dup[0]))
    file_rows = table.column("row_id").to_numpy().astype(np.int64)
    pos_in_file = {int(r): i for i, r in enumerate(file_rows)}
    keep = np.array([i for i, r in enumerate(row_ids) if int(r) in pos_in_file], dtype=np.int64)
    if not len(keep):
        raise DataError(f, f"no row_id matches the dataset's {split} rows (teacher built for another dataset?)")
    return keep, ids[[pos_in_file[int(row_ids[i])] for i in keep]]


def dataset_path(student, override: str | None) -> Path:
    p = Path(override or student.config.data.path)
    if not p.exists() and student.run_dir is not None and (student.run_dir / p).exists():
        p = student.run_dir / p
    return p


@torch.no_grad()
def student_topk(student, dataset, split: str, k: int, batch_size: int = 1024) -> torch.Tensor:
    """Top-k ids Long[R, k] of every row of ``split`` (full ranking, eval mode, the run's protocol
    for history masking)."""
    from dllm2rec.train.batches import split_tensors
    from dllm2rec.eval.metrics import topk_items

    if not 0 < k <= dataset.n_items:
        raise ConfigError(f"top-k = {k} must lie in 1..{dataset.n_items} (the dataset's item count)")
    data = split_tensors(dataset.splits[split], student.max_len, dataset.padding_id, split)
    mask = bool(getattr(student.config.eval, "mask_history", False)) if student.config is not None else False
    w, b = student.output_weight, student.output_bias
    out = []
    for s in range(0, len(data), batch_size):
        hist = data.history[s:s + batch_size]
        h = student.encode(hist, data.lengths[s:s + batch_size])
        out.append(topk_items(h, w, b, k, exclude=hist if mask else None))
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)
