"""The training objective of one step: named loss terms from one forward pass.

``StepObjective(cfg, n_items, train_targets, teacher)(encoder, student, batch, generator)``
returns ``{name: scalar tensor}`` (already weighted: ``bce``, ``ce``, ``sampled_softmax``,
``dro`` = alpha * DRO, ``rd`` = lam * RD); the total loss is their sum. Every full-catalogue
term goes through the chunked functions of ``losses`` / ``distill`` / ``softmax``, so no
[B, N] tensor larger than one item chunk is ever built.

``encoder`` is the (possibly DDP/DeepSpeed-wrapped) ``Encoder``: the forward pass must go
through the wrapper for gradient synchronisation; the output layer's weight and bias are then
used directly (they are parameters of the wrapped module, so their gradients are reduced too).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dllm2rec import precision
from dllm2rec.losses import distill
from dllm2rec.losses import base as losses
from dllm2rec.losses import softmax
from dllm2rec.train.batches import Batch


class Encoder(nn.Module):
    """Wraps a student so that ``forward`` returns ``encode(...)`` -> Float[B, H] (not [B, N]).

    ``matmul_dtype`` (None = fp32): dtype of the ED projection's products (``train.matmul_dtype``)."""

    def __init__(self, student: nn.Module, matmul_dtype: torch.dtype | None = None):
        super().__init__()
        self.student = student
        self.matmul_dtype = matmul_dtype

    def forward(self, history, lengths, llm_table=None):
        if llm_table is None:
            return self.student.encode(history, lengths)
        if self.matmul_dtype is None:
            return self.student.encode(history, lengths, llm_table=llm_table)
        return self.student.encode(history, lengths, llm_table=llm_table, matmul_dtype=self.matmul_dtype)


class StepObjective:
    """Holds the per-run constants of the objective (popularity weights, log-q, config)."""

    def __init__(self, cfg, n_items: int, train_targets: torch.Tensor, teacher=None):
        self.cfg = cfg
        self.n_items = n_items
        self.teacher = teacher
        counts = torch.bincount(train_targets, minlength=n_items).double()
        self.dro_p = losses.item_popularity_weights(train_targets, n_items) if cfg.loss.dro_alpha > 0 else None
        # log q for sampled softmax: smoothed popularity, normalised.
        self.log_q = torch.log((counts + 1) / (counts + 1).sum()).float()
        self.mm_dtype = precision.resolve(cfg.train.matmul_dtype)  # None = fp32 (default)
        self.llm_table = teacher.embeddings if (teacher is not None and cfg.distill.ed.enabled) else None
        if self.llm_table is not None and self.mm_dtype is not None:
            # With reduced-precision products the table is only ever read through a cast to mm_dtype
            # (ED forward, its weight gradient, the evaluation projection): cast it once here rather
            # than every gathered slice of every step. Same values; `bench train --profile`: ED 12.2 ->
            # 6.2 ms a step (BENCHMARKS.md). Costs one bf16 copy of the table (the teacher keeps its own).
            self.llm_table = self.llm_table.to(self.mm_dtype)
        self.rd_k = cfg.distill.rd.k if cfg.distill.rd.enabled else 0
        # train.fast_step: the target / negative / candidate logits come from one gather. Each
        # separate gather's backward builds and sums a dense [N, H] gradient; merging them changes
        # the order of the fp32 gradient sums, so the default keeps them separate (bit-identical
        # to runs made before the option).
        # It also runs the DRO catalogue forward (and evaluation's rank count) as compiled kernels
        # (losses/fused.py).
        self.fast_step = cfg.train.fast_step
        # lazy_adam: gathers of the output layer return row-sparse gradients (the optimiser then
        # touches only the batch's rows; a full-catalogue term still makes the gradient dense).
        self.sparse = cfg.train.optimizer == "lazy_adam"
        # Optional ``timer(name)`` context manager: ``bench train --profile`` times the sections
        # "forward: encoder", "forward: DRO catalogue pass" and "forward: RD" with it.
        self.timer = None

    def prepare(self, batch_rows, device=None) -> float:
        """One-off work before the first step: with ``train.fast_step``, compile the fused kernels
        (``losses.fused.warm_up``): the DRO pass's for the score blocks of batches of ``batch_rows``
        rows (when the run has a kept-factor DRO pass) and evaluation's rank count (always).
        Returns the seconds spent (0.0 when there is nothing to do)."""
        if not self.fast_step:
            return 0.0
        from dllm2rec.losses import fused

        dro = self.dro_p is not None and self.cfg.loss.item_chunk >= self.n_items
        shapes = set().union(*(softmax.fused_blocks(r, self.n_items, self.cfg.loss.item_chunk) for r in batch_rows))
        kernels = ("dro_block", "count_greater") if dro else ("count_greater",)
        return fused.warm_up(sorted(shapes), self.n_items, self.mm_dtype, device, kernels)

    def _section(self, name: str):
        return contextlib.nullcontext() if self.timer is None else self.timer(name)

    def __call__(self, encoder: nn.Module, student: nn.Module, batch: Batch,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        chunk = cfg.loss.item_chunk
        with self._section("forward: encoder"):
            h = encoder(batch.history, batch.lengths, self.llm_table)
        weight, bias = student.output.weight, student.output.bias
        terms: dict[str, torch.Tensor] = {}
        neg_logits = None
        obj = cfg.loss.objective
        sel = None  # merged gather: columns [target, negative, teacher candidates...]
        if obj == "bce":
            neg = losses.sample_negatives(batch.history, batch.target, self.n_items, generator=generator)
            if self.fast_step:
                cols = [batch.target[:, None], neg[:, None]] + ([batch.cand] if self.rd_k else [])
                sel = softmax.gather_logits(h, weight, bias, torch.cat(cols, 1), self.sparse, fast=True)
                pos_logits, neg_logits = sel[:, 0], sel[:, 1]
            else:
                pos_logits = softmax.gather_logits(h, weight, bias, batch.target, self.sparse)
                neg_logits = softmax.gather_logits(h, weight, bias, neg, self.sparse)
            terms["bce"] = losses.bce_loss(pos_logits, neg_logits)
        elif obj == "ce" and not self.rd_k:
            terms["ce"] = softmax.chunked_cross_entropy(h, weight, bias, batch.target, chunk, self.mm_dtype)
        elif obj == "sampled_softmax":
            terms["sampled_softmax"] = softmax.sampled_softmax_loss(
                h, weight, bias, batch.target, cfg.loss.num_sampled, self.log_q.to(h.device), generator, self.sparse)
        alpha = cfg.loss.dro_alpha
        dro_cand = top = None
        if alpha > 0:
            # One catalogue pass serves the target and (official RD) every teacher candidate.
            official = self.rd_k and cfg.distill.rd.variant == "official" and obj == "bce"
            cols = torch.cat([batch.target[:, None], batch.cand], 1) if official else batch.target[:, None]
            y = None if sel is None else (torch.cat([sel[:, :1], sel[:, 2:]], 1) if official else sel[:, :1])
            # With RD on, the same score pass also yields the student's top-k (consistency weight).
            with self._section("forward: DRO catalogue pass"):
                out = losses.dro_loss(h, weight, bias, cols, self.dro_p.to(h.device), cfg.loss.dro_beta, chunk,
                                      topk=self.rd_k, matmul_dtype=self.mm_dtype, y=y, use_fused=self.fast_step)
            dro, top = out if self.rd_k else (out, None)
            terms["dro"] = alpha * dro[:, 0].mean()
            dro_cand = dro[:, 1:] if official else None
        if self.rd_k:
            with self._section("forward: RD"):
                cand_logits = None if sel is None else sel[:, 2:]
                terms.update(self._rd(h, weight, bias, batch, neg_logits, dro_cand, top, cand_logits))
        return terms

    def _rd(self, h, weight, bias, batch: Batch, neg_logits, dro_cand, top,
            cand_logits=None) -> dict[str, torch.Tensor]:
        cfg, rd = self.cfg, self.cfg.distill.rd
        chunk = cfg.loss.item_chunk
        with torch.no_grad():
            if top is not None:
                member = distill.membership(batch.cand, top)
            else:
                member = distill.student_topk_membership(h.detach(), weight.detach(), bias.detach(), batch.cand, rd.k, chunk)
        w = distill.rd_weights(batch.cand_dist, member, batch.gt_dist, rd)
        if batch.cand_mask is not None:  # rows the teacher did not rank contribute no RD
            w = w * batch.cand_mask[:, None]
            if dro_cand is not None:
                dro_cand = dro_cand * batch.cand_mask[:, None]
        if cfg.loss.objective == "ce":
            # Softmax students: the teacher candidates smooth the one-hot target (see softmax.soft_target_ce).
            return {"ce": softmax.soft_target_ce(h, weight, bias, batch.target, batch.cand, w, rd.soft_target_mix, chunk,
                                                 self.mm_dtype)}
        if cand_logits is None:
            cand_logits = softmax.gather_logits(h, weight, bias, batch.cand, self.sparse)
        if rd.variant == "paper":
            return {"rd": rd.lam * distill.rd_loss_paper(cand_logits, w)}
        if neg_logits is None:
            raise ValueError("the official RD loss needs the BCE objective's sampled negative (loss.objective=bce)")
        return {"rd": rd.lam * distill.rd_loss_official(cand_logits, neg_logits, w, dro_cand, cfg.loss.dro_alpha)}
