"""Lazy Adam: Adam for dense gradients, row-wise Adam for sparse ones (``train.optimizer=lazy_adam``).

Why: with a large catalogue a student step touches a few thousand of the N item rows, yet plain
Adam needs dense [N, H] gradients (allocated, zero-filled, accumulated) and updates all N rows of
the weights and both moment buffers every step, so a step costs O(N) however small the batch
(BENCHMARKS.md, the pipeline at scale). With ``lazy_adam`` the item embedding and the output
layer's gathers return row-sparse gradients (``nn.Embedding(sparse=True)``,
``losses.softmax.gather_rows``) and this optimiser updates only the rows present in them.

What changes (it is a different optimiser, not a faster Adam): a row's moments decay only on the
steps that touch it, and an untouched row does not move (plain Adam keeps moving it with its old
momentum). This is the semantics of TensorFlow Addons' LazyAdam and of ``torch.optim.SparseAdam``;
the bias correction uses the parameter's step count, as both do. A row that every step touches
gets exactly Adam's update; a parameter whose gradient arrives dense (every non-catalogue
parameter, or a catalogue table that a full-catalogue loss term also reached) gets torch's own
Adam step. ``weight_decay`` is Adam's L2 term, applied to the touched rows only.
"""
from __future__ import annotations

import math

import torch


class LazyAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose parameters with sparse gradients get a lazy row-wise update.

    State per parameter has Adam's keys (``step``, ``exp_avg``, ``exp_avg_sq``), so state_dict /
    load_state_dict and checkpoints work unchanged. ``amsgrad`` / ``maximize`` are not supported."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # evaluated here, so that Adam's step below never sees a sparse gradient
            with torch.enable_grad():
                loss = closure()
        sparse = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    sparse.append((p, group, p.grad))
                    p.grad = None  # hidden from Adam's dense step
        try:
            super().step()
            for p, group, g in sparse:
                self._lazy_step(p, g, group)
        finally:
            for p, _, g in sparse:
                p.grad = g
        return loss

    def _lazy_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("LazyAdam supports neither amsgrad nor maximize")
        grad = grad.coalesce()  # repeated ids of a batch are summed here
        rows = grad.indices()[0]
        values = grad.values()
        if rows.numel() == 0:
            return
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        beta1, beta2 = group["betas"]
        if group["weight_decay"]:
            values = values.add(p.index_select(0, rows), alpha=group["weight_decay"])
        m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(values, alpha=1.0 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1.0 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        # The same arithmetic as torch's single-tensor Adam step, on the touched rows only.
        step_size = group["lr"] / (1.0 - beta1 ** t)
        denom = v.sqrt_().div_(math.sqrt(1.0 - beta2 ** t)).add_(group["eps"])
        p.index_copy_(0, rows, p.index_select(0, rows).addcdiv_(m, denom, value=-step_size))
