"""Input item embeddings, with optional collaborative embedding distillation (ED).

ED (SPEC section 4): the input embedding of a history item i becomes

    e_i = ID_emb(i) + ed_weight * Linear(d_llm -> H)(z_i)

with z_i the frozen teacher item embedding (zeros at padding). ``learnable_offset=False`` drops
the ID embedding (ablation: projected LLM embedding only). The projection part is exactly zero at
padding positions (the reference code adds the Linear's bias there; every student masks or skips
padding positions anyway, so the value there never reaches the output).

Three ways to feed the teacher embeddings (all give the same result):
- ``llm_hist``  Float[B, L, d]: raw teacher embeddings gathered for the history ids (the
  ARCHITECTURE contract; use ``gather_history(table, history)``).
- ``llm_table`` Float[N, d]: the whole teacher table; the model gathers and projects only the
  distinct ids of the batch (faster in training: a batch of 256 x 10 ids holds far fewer distinct
  items, and the 4096-wide gather is the costliest memory traffic of a step).
- ``llm_hist_projected`` Float[B, L, H]: histories already projected with
  ``project_llm_table(model, table)`` (serving: precompute once, the wide table is then not needed).
"""
from __future__ import annotations

import torch
from torch import nn

from dllm2rec import precision


_GATHER_ROWS = 256  # teacher rows gathered at once by _GatherProject (256 x 4096 floats = 4 MiB)


class _GatherProject(torch.autograd.Function):
    """Linear(table[ids]) for a frozen ``table`` without materialising or saving table[ids].

    Rows are gathered in cache-sized slices, in forward and again in backward (for the weight
    gradient), instead of one [U, d] copy (~40 MB for 2.5k ids at d = 4096) kept for backward.
    ``mm_dtype`` (``dllm2rec.precision``): None = fp32 products, else both products in that dtype."""

    @staticmethod
    def forward(ctx, table, ids, weight, bias, mm_dtype=None):
        out = torch.empty(ids.numel(), weight.shape[0], dtype=weight.dtype, device=weight.device)
        wt = weight.t() if mm_dtype is None else weight.t().to(mm_dtype)  # cast once, not per slice
        for i in range(0, ids.numel(), _GATHER_ROWS):
            if mm_dtype is None:
                z = table.index_select(0, ids[i:i + _GATHER_ROWS]).to(weight.dtype)
                torch.addmm(bias, z, wt, out=out[i:i + _GATHER_ROWS])
            else:
                z = table.index_select(0, ids[i:i + _GATHER_ROWS])
                out[i:i + _GATHER_ROWS] = precision.addmm(bias, z, wt, mm_dtype)
        ctx.save_for_backward(ids)
        ctx.table, ctx.mm_dtype = table, mm_dtype
        return out

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        table, ctx.table = ctx.table, None
        gw = gb = None
        if ctx.needs_input_grad[2]:
            gw = torch.zeros(g.shape[1], table.shape[1], dtype=g.dtype, device=g.device)
            for i in range(0, ids.numel(), _GATHER_ROWS):
                if ctx.mm_dtype is None:
                    z = table.index_select(0, ids[i:i + _GATHER_ROWS]).to(g.dtype)
                    gw.addmm_(g[i:i + _GATHER_ROWS].t(), z)
                else:
                    z = table.index_select(0, ids[i:i + _GATHER_ROWS])
                    gw.add_(precision.mm(g[i:i + _GATHER_ROWS].t(), z, ctx.mm_dtype))
        if ctx.needs_input_grad[3]:
            gb = g.sum(0)
        return None, None, gw, gb, None


def gather_history(table: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` (Float[N, D]) for ``history`` (Long[B, L]); ids >= N (padding) give zeros.

    Returns Float[B, L, D]."""
    n = table.shape[0]
    valid = history < n
    rows = table[history.clamp(max=n - 1)]
    return rows * valid.unsqueeze(-1).to(rows.dtype)


class InputEmbedding(nn.Module):
    """Item id embedding (N+1 rows, padding row N) plus the optional ED projection."""

    def __init__(self, n_items: int, hidden: int, llm_dim: int | None = None,
                 ed_weight: float = 0.2, learnable_offset: bool = True, sparse_grad: bool = False):
        """``sparse_grad``: the id embedding's gradient is a sparse tensor holding only the batch's rows
        (for ``train.optimizer=lazy_adam``: a dense [N+1, H] gradient per step costs O(N))."""
        super().__init__()
        if llm_dim is None and not learnable_offset:
            raise ValueError("learnable_offset=False needs an LLM table (llm_dim): the input would be empty")
        self.n_items = n_items
        self.hidden = hidden
        self.llm_dim = llm_dim
        self.ed_weight = float(ed_weight)
        self.item = None
        if learnable_offset:
            self.item = nn.Embedding(n_items + 1, hidden, sparse=sparse_grad)
            nn.init.normal_(self.item.weight, 0.0, 0.01)  # reference init
        self.llm_proj = nn.Linear(llm_dim, hidden) if llm_dim is not None else None

    def forward(self, history: torch.Tensor, llm_hist: torch.Tensor | None = None,
                llm_table: torch.Tensor | None = None,
                llm_hist_projected: torch.Tensor | None = None,
                matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        """history Long[B, L] -> Float[B, L, H] (padding positions hold ID_emb(N) or zeros).

        ``matmul_dtype`` (``train.matmul_dtype`` via ``dllm2rec.precision``): dtype of the ED
        projection's products; None (default) = fp32."""
        out = self.item(history) if self.item is not None else None
        if self.llm_proj is None:
            if llm_hist is not None or llm_table is not None or llm_hist_projected is not None:
                raise ValueError("teacher embeddings given to a student built without ED (llm_dim=None)")
            return out
        given = sum(x is not None for x in (llm_hist, llm_table, llm_hist_projected))
        if given != 1:
            # A student trained with ED is meaningless without it: refuse rather than silently drop ED.
            raise ValueError("an ED student needs exactly one of llm_hist, llm_table, llm_hist_projected")
        valid = (history < self.n_items).unsqueeze(-1)
        if llm_hist_projected is not None:
            proj = llm_hist_projected
        elif llm_hist is not None:
            if llm_hist.shape[:2] != history.shape or llm_hist.shape[-1] != self.llm_dim:
                raise ValueError(f"llm_hist has shape {tuple(llm_hist.shape)}, expected "
                                 f"{tuple(history.shape) + (self.llm_dim,)}")
            proj = precision.linear(llm_hist, self.llm_proj.weight, self.llm_proj.bias, matmul_dtype)
        else:
            if llm_table.dim() != 2 or llm_table.shape[1] != self.llm_dim:
                raise ValueError(f"llm_table has shape {tuple(llm_table.shape)}, expected [N, {self.llm_dim}]")
            ids = history.clamp(max=self.n_items - 1)
            uniq, inverse = torch.unique(ids, return_inverse=True)
            if llm_table.requires_grad:  # not the frozen-teacher case: plain autograd
                proj = precision.linear(llm_table[uniq], self.llm_proj.weight, self.llm_proj.bias, matmul_dtype)
            else:
                proj = _GatherProject.apply(llm_table, uniq, self.llm_proj.weight, self.llm_proj.bias, matmul_dtype)
            proj = proj[inverse]
        proj = self.ed_weight * (proj * valid.to(proj.dtype))
        return proj if out is None else out + proj


@torch.no_grad()
def project_llm_table(model: nn.Module, table: torch.Tensor, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Project the teacher table once: Float[N, d] -> Float[N, H] (without ed_weight).

    Serve with ``model.encode(history, lengths, llm_hist_projected=gather_history(proj, history))``.
    ``matmul_dtype``: as ``InputEmbedding.forward`` (None = fp32).
    """
    emb: InputEmbedding = model.embed
    if emb.llm_proj is None:
        raise ValueError("model was built without ED (llm_dim=None): nothing to project")
    return precision.linear(table, emb.llm_proj.weight, emb.llm_proj.bias, matmul_dtype)
