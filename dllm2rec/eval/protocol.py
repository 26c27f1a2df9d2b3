"""The evaluation protocol a run followed, as one human-readable label (results.json, manifests).

"standard" = selected on valid, dropout off at evaluation; the reference code's protocol (selected
on test, dropout on) is labelled as such; a fixed row sample (``eval.valid_rows`` / ``eval.test_rows``)
is appended, because its metrics estimate the full split's rather than equal them.
"""
from __future__ import annotations

from dllm2rec.config import RunConfig

REFERENCE_LABEL = "reference-protocol (selected on test, dropout on at eval)"
STANDARD_LABEL = "standard (selected on valid, dropout off at eval)"


def protocol_label(cfg: RunConfig) -> str:
    if cfg.train.select_on == "test" or cfg.train.eval_dropout:
        label = REFERENCE_LABEL if (cfg.train.select_on == "test" and cfg.train.eval_dropout) else (
            f"non-standard (selected on {cfg.train.select_on}, dropout {'on' if cfg.train.eval_dropout else 'off'} at eval)")
    else:
        label = STANDARD_LABEL
    sampled = [f"{name} on a fixed sample of {n:,} rows" for name, n in
               (("valid", cfg.eval.valid_rows), ("test", cfg.eval.test_rows)) if n > 0]
    # a sample that covers the whole split changes nothing, but the label cannot know the split's size
    return label + (f"; {', '.join(sampled)} (eval.sample_seed {cfg.eval.sample_seed})" if sampled else "")
