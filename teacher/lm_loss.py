"""The fine-tune's causal-LM loss, with the LM head applied only where a token is trained.

A causal LM predicts token t+1 at position t, so only the positions whose next token carries a
label (``labels[:, t+1] != -100``) enter the loss. The HF forward computes the LM head (a
[hidden x vocab] product: 576 x 49,152 for SmolLM2-135M, about a fifth of the model's per-token
matrix work) and a float32 log-softmax over the whole vocabulary at EVERY position. With the
answer-only loss (``train_on_inputs: false``) a BIGRec example trains ~10-15 answer tokens of
~200, so almost all of that work is discarded. ``logits: trained`` (the default) asks the model
for the logits of the union, over the batch, of the positions that predict a trained token
(transformers' ``logits_to_keep`` with an index tensor); ``logits: all`` is the HF path.

Both paths give the same loss: the token-weighted mean cross-entropy over the trained tokens
(HF's ``ForCausalLMLoss`` without ``num_items_in_batch``); only the floating-point summation order
of the mean differs. With ``train_on_inputs: true`` every position is trained and the two paths
do the same work.
"""
from __future__ import annotations

# torch is imported inside the functions: teacher.finetune reads LOGITS_MODES at import time, and
# its config parsing must stay light.
LOGITS_MODES = ("trained", "all")
IGNORE_INDEX = -100  # = teacher.finetune_data.IGNORE_INDEX (the label of untrained tokens)


def predicting_positions(labels: "torch.Tensor") -> "torch.Tensor":
    """Long[P], sorted: the positions t (0 <= t < T-1) at which some row of ``labels`` Long[B, T]
    trains its next token (``labels[b, t+1] != -100``)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def token_losses(model, batch: dict, logits: str = "trained") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(loss Float[B, P], next-token labels Long[B, P], positions Long[P]) of a collated batch.

    ``loss[b, j]`` is the cross-entropy of the token at ``positions[j] + 1`` of row b, 0 where that
    token is not trained. ``logits="all"`` takes every position 0..T-2 (P = T-1)."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    if logits == "all":
        pos = torch.arange(labels.shape[1] - 1, device=labels.device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    elif logits == "trained":
        pos = predicting_positions(labels)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=pos).logits
    else:
        raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
    nxt = labels[:, pos + 1]
    tok = F.cross_entropy(out.float().transpose(1, 2), nxt, ignore_index=IGNORE_INDEX, reduction="none")
    return tok, nxt, pos


def mean_loss(model, batch: dict, logits: str = "trained") -> "torch.Tensor":
    """Scalar: mean cross-entropy over the batch's trained tokens (what the optimiser minimises)."""
    tok, nxt, _ = token_losses(model, batch, logits)
    return tok.sum() / (nxt != IGNORE_INDEX).sum().clamp_min(1)
