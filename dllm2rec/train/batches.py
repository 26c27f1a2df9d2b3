"""Dataset split arrays -> tensors, the data order, and per-batch teacher rows.

Determinism contract (what makes mid-epoch resume exact): the order of training rows in an
epoch is a pure function of ``(seed, epoch)`` (``epoch_order``), global batch ``s`` is the
slice ``order[s*B:(s+1)*B]``, and every random draw inside step ``s`` (negatives, dropout)
comes from generators seeded by ``step_seed(seed, epoch, s, rank)``. Nothing depends on how
many steps ran before in this process.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dllm2rec.errors import ConfigError


@dataclass
class SplitTensors:
    """One split as tensors. history: Long [R, L] right-padded with N; lengths/target/row_id: Long [R]."""

    history: torch.Tensor
    lengths: torch.Tensor
    target: torch.Tensor
    row_id: torch.Tensor

    def __len__(self) -> int:
        return int(self.target.shape[0])


def split_tensors(split: dict, max_len: int, padding_id: int, name: str = "split") -> SplitTensors:
    """Convert a dataset split (numpy arrays) to tensors, right-padding history to ``max_len``."""
    hist = np.asarray(split["history"], dtype=np.int64)
    if hist.ndim != 2:
        raise ConfigError(f"{name}: history must be 2-D [R, L], got shape {hist.shape}")
    if hist.shape[1] > max_len:
        raise ConfigError(
            f"{name}: dataset history length {hist.shape[1]} exceeds model.max_len {max_len}; "
            "set model.max_len to the dataset's max_history"
        )
    if hist.shape[1] < max_len:
        pad = np.full((hist.shape[0], max_len - hist.shape[1]), padding_id, dtype=np.int64)
        hist = np.concatenate([hist, pad], axis=1)
    return SplitTensors(
        history=torch.tensor(hist, dtype=torch.long),  # copies: Arrow-backed arrays are read-only
        lengths=torch.tensor(np.asarray(split["history_len"]), dtype=torch.long),
        target=torch.tensor(np.asarray(split["target"]), dtype=torch.long),
        row_id=torch.tensor(np.asarray(split["row_id"]), dtype=torch.long),
    )


def sample_rows(split: SplitTensors, n: int, seed: int, name: str) -> SplitTensors:
    """A fixed sample of ``n`` rows of ``split`` (``eval.valid_rows`` / ``eval.test_rows``), in
    split order; the whole split when ``n`` is 0 or not smaller than it. A pure function of
    (seed, name, len(split), n): every run with the same ``eval.sample_seed`` sees the same rows,
    and the valid and test samples are drawn independently."""
    if n <= 0 or n >= len(split):
        return split
    salt = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng([int(seed), salt, 0xE7A1])
    keep = torch.from_numpy(np.sort(rng.choice(len(split), size=n, replace=False)))
    return SplitTensors(history=split.history[keep], lengths=split.lengths[keep],
                        target=split.target[keep], row_id=split.row_id[keep])


def epoch_order(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    """Shuffled row positions for ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n_rows)


def steps_per_epoch(n_rows: int, batch_size: int, world: int, cap: int = 0) -> int:
    """Number of global batches. A last batch with fewer rows than processes is dropped
    (every rank must take part in each gradient all-reduce); ``cap`` > 0 limits the count."""
    full, rest = divmod(n_rows, batch_size)
    steps = full + (1 if rest >= world and rest > 0 else 0)
    return min(steps, cap) if cap else steps


def global_batch(order: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    return order[step * batch_size:(step + 1) * batch_size]


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed for the random draws of one step on one rank."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(step), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Batch:
    """Tensors for one (local) batch. ``rows`` are positions in the split (also the teacher rows).

    llm_hist: Float [B, L, d] teacher embeddings of the history ids (zeros at padding) or None.
    cand: Long [B, K] teacher candidates, cand_dist: Float [B, K], gt_dist: Float [B] or None.
    """

    rows: torch.Tensor
    history: torch.Tensor
    lengths: torch.Tensor
    target: torch.Tensor
    llm_hist: torch.Tensor | None = None
    cand: torch.Tensor | None = None
    cand_dist: torch.Tensor | None = None
    gt_dist: torch.Tensor | None = None
    cand_mask: torch.Tensor | None = None  # Float [B]: 1 = row has teacher output (partial coverage)

    def __len__(self) -> int:
        return int(self.target.shape[0])


def llm_history(table: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Gather frozen teacher embeddings [N, d] for history [B, L] -> float32 [B, L, d] (zeros at padding id N).

    Only the unique ids of the batch are converted to float32 (the table may be float16)."""
    n = table.shape[0]
    uniq, inv = torch.unique(history, return_inverse=True)
    rows = table[uniq.clamp(max=n - 1)].float() * (uniq < n).unsqueeze(-1)
    return rows[inv]


def make_batch(data: SplitTensors, rows: np.ndarray | torch.Tensor, teacher=None, k: int = 0,
               with_embeddings: bool = False, device: torch.device | str = "cpu") -> Batch:
    """Assemble the batch for split positions ``rows``; teacher rows are gathered by the same
    positions (``TeacherKnowledge`` is aligned to the train split by row_id at load time)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    hist = data.history[idx]
    b = Batch(rows=idx, history=hist, lengths=data.lengths[idx], target=data.target[idx])
    if teacher is not None and with_embeddings:
        b.llm_hist = llm_history(teacher.embeddings, hist)
    if teacher is not None and k > 0:
        np_idx = idx.numpy()
        b.cand = torch.from_numpy(teacher.topk_ids[np_idx, :k])
        b.cand_dist = torch.from_numpy(teacher.topk_dist[np_idx, :k])
        if teacher.gt_dist is not None:
            b.gt_dist = torch.from_numpy(teacher.gt_dist[np_idx])
        if getattr(teacher, "covered", None) is not None:
            b.cand_mask = torch.from_numpy(teacher.covered[np_idx].astype(np.float32))
    if str(device) != "cpu":
        for name in ("rows", "history", "lengths", "target", "llm_hist", "cand", "cand_dist", "gt_dist", "cand_mask"):
            v = getattr(b, name)
            if v is not None:
                setattr(b, name, v.to(device, non_blocking=True))
    return b
