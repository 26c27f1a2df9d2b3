"""Batched constrained beam search (teacher/beam_batch.py) against the one-prompt search.

A tiny, randomly initialised transformers Llama (built in the test, no download): prompts of
different lengths searched together must give the items and log-probabilities of searching each
prompt alone with ``HFStepper`` and the full LM head, for both attention implementations.
"""
from __future__ import annotations

import numpy as np
import pytest

from teacher.trie import TitleTrie, trie_beam_search
from tests.test_teacher_trie import _tiny_llama  # vocab 40, EOS 39


def _trie(seed: int, n: int = 40, eos: int = 39):
    rng = np.random.default_rng(seed)
    seqs = [list(map(int, rng.integers(1, eos - 1, rng.integers(1, 6)))) + [eos] for _ in range(n)]
    seqs = [s for i, s in enumerate(seqs) if s not in seqs[:i] and not any(s[:len(o)] == o for o in seqs if o != s)]
    return TitleTrie(seqs, list(range(len(seqs)))), seqs


@pytest.mark.parametrize("attention,fast", [("eager", True), ("eager", False), ("sdpa", False)])
def test_batched_search_equals_one_prompt_at_a_time(attention, fast):
    from teacher.beam_batch import batched_beam_search
    from teacher.constrained import HFStepper

    model = _tiny_llama()
    model.set_attn_implementation(attention)
    trie, seqs = _trie(1)
    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(1, 38, n))) for n in (5, 9, 3, 7)]
    forces = [seqs[0], seqs[-1], None, seqs[3]]
    k, width = 5, 6
    got = batched_beam_search(model, prompts, trie, k, width, 0.0, forces, fast_llama=fast)
    for prompt, force, res in zip(prompts, forces, got):
        st = HFStepper(model, prompt)
        ref = trie_beam_search(st.first_logits, st, trie, k, width, 0.0, force=force)
        assert res["items"].tolist() == ref["items"].tolist()
        np.testing.assert_allclose(res["logp"], ref["logp"], atol=1e-4)
        if force is None:
            assert res["forced_logp"] is None
        else:
            assert res["forced_logp"] == pytest.approx(ref["forced_logp"], abs=1e-4)
        assert len(set(res["items"].tolist())) == k


def test_restricted_head_equals_full_head_columns():
    import torch

    from teacher.beam_batch import BatchedLM

    model = _tiny_llama()
    lm = BatchedLM(model, [[3, 4, 5], [7, 8]])
    assert lm.plain_head
    allowed = [[2, 9, 30], [39, 1]]
    got = lm.logits(lm.first, allowed)
    with torch.inference_mode():
        full = model.lm_head(lm.first).double().numpy()
    for row, a, g in zip(full, allowed, got):
        np.testing.assert_allclose(g, row[a], atol=1e-5)
    lm.plain_head = False  # the fallback (full head, then the columns) gives the same values
    for g, f in zip(got, lm.logits(lm.first, allowed)):
        np.testing.assert_allclose(g, f, atol=1e-5)


def test_rank_rows_batched_matches_rank_rows_and_packs_ranks():
    from teacher.constrained import rank_rows, rank_rows_batched

    model = _tiny_llama()
    trie, seqs = _trie(4)

    class Tok:  # prompts are given as space-separated ids
        def __call__(self, text):
            return {"input_ids": [int(t) for t in text.split()]}

    prompts = ["5 6 7", "9 1 2 3 4 8", "11 12", "3 3 3 3"]
    targets = np.array([0, 2, len(seqs) - 1, 1])
    old = rank_rows(model, Tok(), trie, seqs, prompts, targets, 4, 5, 0.0)
    new = rank_rows_batched(model, Tok(), trie, seqs, prompts, targets, 4, 5, 0.0, batch_prompts=3)
    np.testing.assert_array_equal(old[0], new[0])
    np.testing.assert_allclose(old[1], new[1], atol=1e-4)
    np.testing.assert_allclose(old[2], new[2], atol=1e-4)
    np.testing.assert_array_equal(old[3], new[3])
    assert ((new[3] >= 1) & (new[3] <= 5)).all()


def test_constrained_search_keys_are_validated():
    from dllm2rec.errors import ConfigError
    from teacher.config import load_teacher_config

    cfg = load_teacher_config(None, ["constrained.batch_prompts=4", "constrained.attention=sdpa"])
    assert (cfg.constrained.batch_prompts, cfg.constrained.attention) == (4, "sdpa")
    with pytest.raises(ConfigError, match="constrained.attention"):
        load_teacher_config(None, ["constrained.attention=flash"])
    with pytest.raises(ConfigError, match="constrained.batch_prompts"):
        load_teacher_config(None, ["constrained.batch_prompts=0"])


@pytest.mark.llm
@pytest.mark.slow  # ~30 s: SmolLM2 loaded twice, 3 rows searched 4 times each way
def test_bench_pair_times_both_paths_and_they_agree_in_float32(tmp_path):
    from teacher.bench import _inputs
    from teacher.bench_compare import _constrained_pair
    from teacher.config import load_teacher_config
    from teacher.model import resolve_base_model
    from tests.test_teacher_fast import tiny_dataset

    ds = tiny_dataset(tmp_path / "ds", n_rows=(3, 2, 2))
    cfg = load_teacher_config("launch/configs/teacher_ml100k.yaml", [
        f"dataset={ds}", "model.dtype=float32", "generate.threads=1", "constrained.k=4", "constrained.beam_width=4",
        "constrained.batch_prompts=2"])
    n, (old, new), check = _constrained_pair(cfg, resolve_base_model(cfg.model.base), _inputs(cfg, 1)[2], 3, 1)
    assert n == 3 and old > 0 and new > 0
    assert check.startswith("same 4-item list 3/3 rows, set overlap 1.000, same top-1 3/3")
