"""Losses as pure functions of tensors (no modules, no distribution).

``base`` (BCE with one sampled negative, DRO), ``distill`` (DLLM2Rec ranking distillation:
importance weights and the official / paper losses), ``softmax`` (full-catalogue primitives,
chunked cross-entropy, sampled softmax, soft-target CE).
"""
