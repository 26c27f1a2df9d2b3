"""Training examples for the LoRA fine-tune: seeded row sampling, tokenisation, label masking.

Contract:
- ``sample_rows(n_rows, size, seed)`` -> sorted int64 indices, ``min(size, n_rows)`` of them,
  drawn without replacement from a ``numpy`` generator seeded with ``seed`` (same inputs, same rows).
  This is ``sample_strategy: uniform`` (the default); popular targets dominate such a sample as
  they dominate the split.
- ``sample_balanced(targets, size, max_per_target, seed)`` -> sorted int64 indices
  (``sample_strategy: balanced``): at most ``max_per_target`` rows per target item, spread
  evenly: every target gets its 1st row before any gets a 2nd, and so on (round-robin over a
  seeded shuffle), so rare targets are taken whole before popular ones get more rows; where a
  round does not fit into ``size`` a seeded random subset of its targets is taken. Returns
  ``min(size, rows the cap allows)`` indices; fewer than ``size`` when the cap binds (the caller
  logs it). Same inputs, same rows.
- ``target_coverage(targets, n_items)`` -> ``{"distinct_targets", "target_coverage" (share of the
  catalogue), "max_rows_per_target"}`` of the given target ids.
- ``split_texts(dataset, split, indices)`` -> list of ``(prompt, full_text)`` where ``full_text``
  is ``teacher.prompts.build_training_text`` (prompt + quoted answer) and ``prompt`` is its
  prefix the model is conditioned on (``teacher.prompts.build_prompt``).
- ``encode_example(tokenizer, prompt, full_text, max_length, train_on_inputs)`` -> dict with
  ``input_ids`` / ``labels`` (python lists of equal length <= max_length) and ``n_prompt``
  (number of leading tokens that belong to the prompt). The EOS token is
  appended (BIGRec does the same) so the model learns to stop after the answer. With
  ``train_on_inputs=False`` every token whose text starts inside the prompt gets label -100.
- ``collate(examples, pad_id)`` -> ``input_ids`` / ``attention_mask`` / ``labels`` Long[B, T],
  right-padded; padded label positions are -100 (never the pad id: SmolLM2's pad IS its EOS,
  and the EOS that ends an answer must stay a training target).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from dllm2rec.errors import DataError

IGNORE_INDEX = -100


def sample_rows(n_rows: int, size: int, seed: int) -> np.ndarray:
    """Seeded sample of ``min(size, n_rows)`` distinct row indices, sorted ascending."""
    if n_rows <= 0:
        raise DataError("dataset", "the split has no rows to sample from")
    rng = np.random.default_rng(seed)
    take = min(int(size), int(n_rows))
    return np.sort(rng.choice(n_rows, size=take, replace=False)).astype(np.int64)


def sample_balanced(targets: np.ndarray, size: int, max_per_target: int, seed: int) -> np.ndarray:
    """Target-capped, evenly spread seeded sample of row indices (module docstring), sorted."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.ndim != 1 or len(targets) == 0:
        raise DataError("dataset", "the split has no rows to sample from")
    if int(max_per_target) < 1 or int(size) < 1:
        raise DataError("dataset", f"balanced sampling needs size >= 1 and max_per_target >= 1, "
                                   f"got {size}, {max_per_target}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(targets))
    t = targets[perm]
    # round[i]: how many earlier rows (in the shuffled order) share row i's target
    by_target = np.argsort(t, kind="stable")
    sorted_t = t[by_target]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_t)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(t)]))
    rounds = np.empty(len(t), dtype=np.int64)
    rounds[by_target] = np.arange(len(t)) - group_start
    keep = np.flatnonzero(rounds < int(max_per_target))
    # round first, shuffled position second: a partly taken round is a random subset of targets
    order = keep[np.lexsort((keep, rounds[keep]))]
    return np.sort(perm[order[: int(size)]]).astype(np.int64)


def target_coverage(targets: Sequence[int] | np.ndarray, n_items: int) -> dict[str, float | int]:
    """Distinct target items among ``targets``, their share of ``n_items``, the largest count."""
    t = np.asarray(targets, dtype=np.int64)
    if n_items <= 0:
        raise DataError("dataset", f"n_items must be > 0, got {n_items}")
    if len(t) == 0:
        return {"distinct_targets": 0, "target_coverage": 0.0, "max_rows_per_target": 0}
    _, counts = np.unique(t, return_counts=True)
    return {"distinct_targets": int(len(counts)), "target_coverage": float(len(counts) / n_items),
            "max_rows_per_target": int(counts.max())}


def row_titles(dataset: Any, split: str, index: int) -> tuple[list[str], str]:
    """History titles (oldest first, padding dropped) and the target title of one split row."""
    cols = dataset.splits[split]
    n_items = len(dataset.titles)
    length = int(cols["history_len"][index])
    hist = [int(i) for i in cols["history"][index][:length]]
    target = int(cols["target"][index])
    bad = [i for i in hist + [target] if not 0 <= i < n_items]
    if bad:
        raise DataError(f"split {split}", f"item id {bad[0]} outside 0..{n_items - 1}", row=index)
    return [dataset.titles[i] for i in hist], dataset.titles[target]


def split_texts(dataset: Any, split: str, indices: Sequence[int]) -> list[tuple[str, str]]:
    """(prompt, prompt + answer) pairs for the given rows of ``split``, in the order given."""
    from teacher import prompts

    source = f"{getattr(dataset, 'path', 'dataset')}/manifest.json"
    domain = prompts.Domain.from_manifest(dataset.manifest, source=source)
    pairs = []
    for i in indices:
        history, target = row_titles(dataset, split, int(i))
        prompt = prompts.build_prompt(history, domain)
        full = prompts.build_training_text(history, target, domain)
        if not full.startswith(prompt):
            # The masking below relies on the prompt being a prefix of the training text.
            raise DataError(f"split {split}", "training text does not start with its prompt", row=int(i))
        pairs.append((prompt, full))
    return pairs


def encode_example(tokenizer: Any, prompt: str, full_text: str, max_length: int,
                   train_on_inputs: bool) -> dict[str, list[int]]:
    """Token ids + labels for one example (see module docstring). Truncates from the right."""
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    labels = list(ids)
    # Character offsets are exact even where a token straddles the prompt/answer boundary
    # (such a token starts inside the prompt, so it counts as a prompt token).
    n_prompt = sum(1 for start, _ in enc["offset_mapping"] if start < len(prompt))
    if not train_on_inputs:
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "n_prompt": n_prompt}


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``encode_example`` outputs into Long[B, T] tensors.

    Also returns ``n_prompt`` Long[B] (prompt tokens per row) for the answer-only loss.
    """
    width = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), int(pad_id), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[b, :n] = 1
    n_prompt = torch.tensor([int(e.get("n_prompt", 0)) for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "n_prompt": n_prompt}
