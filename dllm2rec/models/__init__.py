"""Student models (plain ``nn.Module``s; they know nothing about distribution).

Contract (docs/ARCHITECTURE.md): ``encode(history Long[B, L], lengths Long[B], llm_hist
Float[B, L, d] | None, *, llm_table=None, llm_hist_projected=None) -> Float[B, out_dim]``,
``output = nn.Linear(out_dim, N)``, ``forward = output(encode(...))`` -> Float[B, N].
``out_dim`` is the hidden size except for Caser (see caser.py).
"""
from __future__ import annotations

from torch import nn

from dllm2rec.models.caser import Caser
from dllm2rec.models.embedding import InputEmbedding, gather_history, project_llm_table
from dllm2rec.models.gru4rec import GRU4Rec
from dllm2rec.models.sasrec import SASRec

__all__ = ["build_student", "GRU4Rec", "SASRec", "Caser", "InputEmbedding", "gather_history",
           "project_llm_table"]


def build_student(model_cfg, n_items: int, llm_dim: int | None = None, ed_weight: float = 0.2,
                  learnable_offset: bool = True, sparse_grad: bool = False, readout_only: bool = False) -> nn.Module:
    """Build the student named by ``model_cfg.name`` (a ``dllm2rec.config.ModelConfig``).

    ``llm_dim`` = teacher embedding width turns ED on; None builds a plain student.
    ``sparse_grad``: the item id embedding returns row-sparse gradients (``train.optimizer=lazy_adam``).
    ``readout_only`` (SASRec; ``train.fast_step``): the last block runs for the read-out position only.
    """
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    ed = dict(llm_dim=llm_dim, ed_weight=ed_weight, learnable_offset=learnable_offset, sparse_grad=sparse_grad)
    name = model_cfg.name
    if name == "gru4rec":
        return GRU4Rec(n_items, model_cfg.hidden, **ed)
    if name == "sasrec":
        return SASRec(n_items, model_cfg.hidden, model_cfg.max_len, model_cfg.num_heads,
                      model_cfg.num_blocks, model_cfg.dropout, readout_only=readout_only, **ed)
    if name == "caser":
        return Caser(n_items, model_cfg.hidden, model_cfg.max_len, tuple(model_cfg.caser_heights),
                     model_cfg.caser_filters, model_cfg.caser_vertical, model_cfg.dropout, **ed)
    raise ValueError(f"unknown student model {name!r}; choose gru4rec, sasrec or caser")
