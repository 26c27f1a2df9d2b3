"""Importance-aware ranking distillation (RD), SPEC section 4. Pure functions of tensors.

Weights (``rd_weights``), K teacher candidates per row, position k = 1..K:
- position     w_p(k) = exp(-k / beta_p), normalised to sum 1 over k;
- confidence   official: w_c(k) = exp(-d_k) + 1e-8, normalised over the K candidates
               (d_k = the candidate's L2 distance to the generated text);
               paper: a per-row reliability from the ground-truth distance g_b (see below);
- consistency  w_o(k) = [c_k in the student's current top-K] (+ 1e-8 in the official variant,
               unnormalised);
- w = gamma_p w_p + gamma_c w_c + gamma_o w_o over the enabled components.
official: w is renormalised per row to sum 1 (reference code).
paper:    no per-row renormalisation, so the per-row reliability scales the row. Our mapping
          (the paper gives none in closed form): r_b = B * softmax_b(-g_b / s), s = mean_b g_b
          (detached), i.e. exp(-g) with a scale-free temperature, normalised to batch mean 1;
          w_c(b, k) = r_b / K (same scale as the official, K-normalised weight). Rows whose
          teacher generation lies closer to the true item than the batch average weigh more.
Weights are constants (computed without gradient).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from dllm2rec.eval.metrics import topk_items


def position_weights(k: int, beta: float = 1.0, device=None) -> torch.Tensor:
    """w_p(k) = exp(-k / beta), k = 1..K, normalised to sum 1 -> Float[K]."""
    w = torch.exp(-torch.arange(1, k + 1, dtype=torch.float32, device=device) / beta)
    return w / w.sum()


@torch.no_grad()
def rd_weights(topk_dist: torch.Tensor, in_student_topk: torch.Tensor | None, gt_dist: torch.Tensor | None,
               cfg) -> torch.Tensor:
    """RD weights Float[B, K] from teacher distances Float[B, K], consistency Bool[B, K] and the
    per-row ground-truth distance Float[B] (paper variant). ``cfg`` is a ``dllm2rec.config.RDConfig``.
    """
    b, k = topk_dist.shape
    d = topk_dist.float()
    parts = []
    if cfg.use_position and cfg.gamma_position > 0:
        parts.append(cfg.gamma_position * position_weights(k, cfg.beta_position, d.device).expand(b, k))
    if cfg.use_confidence and cfg.gamma_confidence > 0:
        if cfg.variant == "official":
            wc = torch.exp(-d) + 1e-8
            wc = wc / wc.sum(1, keepdim=True)
        else:
            if gt_dist is None:
                raise ValueError("paper RD confidence needs the per-row ground-truth distance (gt_dist)")
            g = gt_dist.float()
            scale = g.mean().clamp_min(1e-12)
            r = b * torch.softmax(-g / scale, 0)
            wc = (r / k)[:, None].expand(b, k)
        parts.append(cfg.gamma_confidence * wc)
    if cfg.use_consistency and cfg.gamma_consistency > 0:
        if in_student_topk is None:
            raise ValueError("RD consistency weight needs in_student_topk")
        wo = in_student_topk.float()
        if cfg.variant == "official":
            wo = wo + 1e-8
        parts.append(cfg.gamma_consistency * wo)
    if not parts:
        raise ValueError("RD is enabled but every weight component is switched off or has gamma 0")
    w = torch.stack(parts).sum(0)
    if cfg.variant == "official":
        w = w / w.sum(1, keepdim=True)
    elif cfg.variant != "paper":
        raise ValueError(f"unknown RD variant {cfg.variant!r}; choose official or paper")
    return w


@torch.no_grad()
def student_topk_membership(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cand: torch.Tensor,
                            k: int | None = None, chunk: int = 65536) -> torch.Tensor:
    """Bool[B, K]: is candidate c_bk among row b's top-k student items (k defaults to K)?

    Top-k over all N items in chunks (never more than B x chunk scores at once)."""
    return membership(cand, topk_items(h, weight, bias, k or cand.shape[1], chunk))


def membership(cand: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Bool[B, K]: cand[b, k] in top[b, :] (top = student top-k ids, e.g. from ``dro_loss(topk=)``)."""
    return (cand[:, :, None] == top[:, None, :]).any(-1)


def rd_loss_official(cand_logits: torch.Tensor, neg_logits: torch.Tensor, w: torch.Tensor,
                     dro_cand: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """Reference-code RD loss (before the lam factor) -> scalar:

        sum_k mean_b[ w_bk * -(log sigmoid(y_{c_bk}) + log sigmoid(1 - y_neg_b)) ]
        + [alpha > 0] alpha * sum_k mean_b(w_bk) * mean_b(dro_cand_bk)

    keeping the reference's quirks: sigmoid(1 - y_neg) rather than sigmoid(-y_neg), the base
    loss's single negative reused for every k, and the DRO part weighted only on average (a
    [B,1] x [B] broadcast in the reference). cand_logits Float[B, K], neg_logits Float[B],
    w Float[B, K], dro_cand Float[B, K] = ``dro_loss`` with each candidate as the positive.
    """
    b = cand_logits.shape[0]
    bce = -(F.logsigmoid(cand_logits) + F.logsigmoid(1.0 - neg_logits)[:, None])
    loss = (w * bce).sum() / b
    if alpha > 0:
        if dro_cand is None:
            raise ValueError("rd_loss_official with alpha > 0 needs dro_cand")
        loss = loss + alpha * (w.mean(0) * dro_cand.mean(0)).sum()
    return loss


def rd_loss_paper(cand_logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Paper RD loss -> scalar: mean over rows of -sum_k w_bk log sigmoid(y_{c_bk}).

    The paper sums over rows; we average so that lambda does not depend on the batch size
    (sum = B x this value)."""
    return -(w * F.logsigmoid(cand_logits)).sum(1).mean()
