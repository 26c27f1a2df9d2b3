"""What a run reads before training or evaluation: dataset, teacher knowledge, split tensors, student.

``load_inputs(cfg)`` is shared by ``dllm2rec.train.loop`` and ``dllm2rec.eval.evaluate`` (it sits
below both so that neither imports the other for it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm2rec.config import RunConfig
from dllm2rec.errors import ConfigError
from dllm2rec.train.batches import SplitTensors, sample_rows, split_tensors


@dataclass
class Inputs:
    dataset: object
    teacher: object
    splits: dict[str, SplitTensors]
    student: torch.nn.Module
    llm_table: torch.Tensor | None


def load_inputs(cfg: RunConfig) -> Inputs:
    """Dataset, validated teacher knowledge, split tensors and a freshly initialised student.
    The valid / test tensors hold the fixed samples of ``eval.valid_rows`` / ``eval.test_rows``
    rows when those are set (``batches.sample_rows``)."""
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.data.knowledge import load_teacher
    from dllm2rec.models import build_student

    dataset = load_dataset(cfg.data.path)
    teacher = None
    rd, ed = cfg.distill.rd, cfg.distill.ed
    if rd.enabled or ed.enabled:
        teacher = load_teacher(cfg.distill.teacher, dataset, cfg.distill.min_coverage)
        if rd.enabled and rd.k > teacher.top_n:
            raise ConfigError(f"distill.rd.k = {rd.k} exceeds the teacher's top_n = {teacher.top_n} ({teacher.path})")
        if rd.enabled and rd.variant == "paper" and teacher.gt_dist is None:
            raise ConfigError(f"distill.rd.variant=paper needs gt_dist, which {teacher.path} lacks "
                              f"({teacher.source} format); use variant=official")
    splits = {name: split_tensors(dataset.splits[name], cfg.model.max_len, dataset.padding_id, name)
              for name in ("train", "valid", "test")}
    for name, n in (("valid", cfg.eval.valid_rows), ("test", cfg.eval.test_rows)):
        splits[name] = sample_rows(splits[name], n, cfg.eval.sample_seed, name)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student = build_student(cfg.model, dataset.n_items, teacher.emb_dim if (teacher is not None and ed.enabled) else None,
                            ed.weight, ed.learnable_offset, sparse_grad=cfg.train.optimizer == "lazy_adam",
                            readout_only=cfg.train.fast_step)
    llm_table = teacher.embeddings if (teacher is not None and ed.enabled) else None
    return Inputs(dataset, teacher, splits, student, llm_table)
