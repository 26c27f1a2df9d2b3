"""Constrained decoding (teacher/trie.py, teacher/constrained.py) over random catalogues.

The search is tested model-free with a deterministic random "model" (logits a hash of the
prefix), where an exhaustive beam must equal brute-force scoring of every item, and with a real
(tiny, randomly initialised) transformers Llama through ``HFStepper`` and ``model.generate``.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teacher.trie import TitleTrie, TrieLogitsProcessor, _log_softmax, trie_beam_search

V, EOS = 12, 11


def prefix_logits(prefix) -> np.ndarray:
    """A deterministic 'model': next-token logits as a function of the prefix alone."""
    seed = hash(tuple(int(t) for t in prefix)) % (2 ** 32)
    return np.random.default_rng(seed).normal(size=V) * 3


class FakeStepper:
    """``step`` contract of trie_beam_search over ``prefix_logits`` (tracks each row's prefix)."""

    def __init__(self):
        self.rows = [()]
        self.calls = 0

    def __call__(self, parents, tokens):
        self.calls += 1
        self.rows = [self.rows[p] + (t,) for p, t in zip(parents, tokens)]
        return np.stack([prefix_logits(r) for r in self.rows])


def path_logp(trie, seq) -> float:
    node, total = 0, 0.0
    for i, t in enumerate(seq):
        allowed = trie.allowed(node)
        total += float(_log_softmax(prefix_logits(seq[:i]).astype(np.float64)[allowed])[allowed.index(t)])
        node = trie.child(node, t)
    return total


catalogues = st.lists(st.lists(st.integers(0, V - 2), min_size=1, max_size=5), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(catalogues, st.integers(1, 8), st.integers(0, 3))
def test_beam_search_returns_distinct_real_items_sorted_and_exhaustive_equals_brute_force(titles, k, extra):
    seqs = [t + [EOS] for t in titles]
    trie = TitleTrie(seqs, list(range(len(seqs))))
    res = trie_beam_search(prefix_logits(()), FakeStepper(), trie, k, k + extra, force=seqs[0])
    items = res["items"]
    assert len(set(items.tolist())) == len(items) <= k  # distinct items
    assert all(0 <= i < len(seqs) for i in items)  # real items
    assert np.all(np.diff(res["score"]) <= 1e-12)  # best first
    for i, lp in zip(items, res["logp"]):  # reported log-prob = the item's own path log-prob
        assert lp == pytest.approx(path_logp(trie, seqs[i]), abs=1e-9)
    assert res["forced_logp"] == pytest.approx(path_logp(trie, seqs[0]), abs=1e-9)
    # beams wider than the catalogue: exhaustive, so the top-k equals brute-force scoring
    full = trie_beam_search(prefix_logits(()), FakeStepper(), trie, k, len(seqs) + 1)
    brute = sorted(((path_logp(trie, s), i) for i, s in enumerate(seqs)), key=lambda x: (-x[0], x[1]))
    want = [lp for lp, _ in brute[:min(k, len(seqs))]]
    np.testing.assert_allclose(full["logp"], want, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(catalogues, st.integers(0, 2 ** 31), st.integers(1, 4))
def test_trie_processor_never_emits_a_non_catalogue_title(titles, seed, prompt_len):
    import torch

    seqs = [t + [EOS] for t in titles]
    trie = TitleTrie(seqs, list(range(len(seqs))))
    proc = TrieLogitsProcessor(trie, prompt_len, EOS)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, prompt_len), generator=gen)
    for _ in range(trie.depth + 2):  # greedy on random scores, as model.generate would step
        scores = proc(ids, torch.randn(3, V, generator=gen))
        ids = torch.cat([ids, scores.argmax(dim=1, keepdim=True)], dim=1)
    for row in ids[:, prompt_len:].tolist():
        end = row.index(EOS) + 1
        assert row[:end] in seqs and all(t == EOS for t in row[end:])


def test_ghost_tokens_cost_nothing_and_length_penalty_counts_only_choices():
    # item 0: 1 choice then 3 forced tokens; item 1: 1 choice only. Forced tokens add log-prob 0.
    seqs = [[1, 5, 6, 7, EOS], [2, EOS]]
    trie = TitleTrie(seqs, [0, 1])
    res = trie_beam_search(prefix_logits(()), FakeStepper(), trie, 2, 2)
    first = _log_softmax(prefix_logits(()).astype(np.float64)[[1, 2]])
    np.testing.assert_allclose(sorted(res["logp"], reverse=True), sorted(first, reverse=True), atol=1e-12)
    with pytest.raises(ValueError, match="prefix"):
        TitleTrie([[1, 2], [1, 2, 3]], [0, 1])
    dup = TitleTrie([[1, EOS], [1, EOS], [2, EOS]], [0, 1, 2])  # identical titles: one leaf, both items
    assert dup.leaf_items([1, EOS]) == [0, 1]
    assert len(trie_beam_search(prefix_logits(()), FakeStepper(), dup, 3, 3)["items"]) == 3


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=39, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_hf_stepper_beam_search_matches_full_forward_and_generate_obeys_the_trie():
    import torch

    from teacher.constrained import HFStepper

    model = _tiny_llama()
    rng = np.random.default_rng(3)
    seqs = [list(rng.integers(1, 38, rng.integers(1, 6))) + [39] for _ in range(25)]
    seqs = [s for i, s in enumerate(seqs) if s not in seqs[:i] and not any(s[:len(o)] == o for o in seqs if o != s)]
    trie = TitleTrie(seqs, list(range(len(seqs))))
    prompt = [5, 9, 2, 17, 30]
    st_ = HFStepper(model, prompt)
    res = trie_beam_search(st_.first_logits, st_, trie, 5, 8, force=seqs[-1])
    assert len(set(res["items"].tolist())) == len(res["items"]) == 5

    def full_logp(seq):  # renormalised over the trie's children, one full forward, no cache
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + seq])).logits[0].double().numpy()
        node, total = 0, 0.0
        for i, t in enumerate(seq):
            allowed = trie.allowed(node)
            total += float(_log_softmax(logits[len(prompt) - 1 + i][allowed])[allowed.index(t)])
            node = trie.child(node, t)
        return total

    for item, lp in zip(res["items"], res["logp"]):
        assert lp == pytest.approx(full_logp(seqs[item]), abs=1e-4)
    assert res["forced_logp"] == pytest.approx(full_logp(seqs[-1]), abs=1e-4)
    out = model.generate(torch.tensor([prompt, prompt[::-1]]), max_new_tokens=trie.depth + 1, num_beams=3,
                         do_sample=False, logits_processor=[TrieLogitsProcessor(trie, len(prompt), 39)],
                         pad_token_id=0, eos_token_id=39)
    for row in out[:, len(prompt):].tolist():
        assert row[: row.index(39) + 1] in seqs


@pytest.mark.llm
@pytest.mark.slow  # ~2 min on the shared 2-core machine (7 rows, two model loads, MiniLM twice)
def test_constrained_phase_with_smollm2_writes_a_loadable_teacher_folder(tmp_path):
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.data.knowledge import load_teacher
    from teacher.cli import run
    from tests.test_teacher_fast import TITLES, tiny_dataset

    ds = tiny_dataset(tmp_path / "ds", n_rows=(3, 2, 2))
    args = ["--config", "launch/configs/teacher_ml100k.yaml", f"dataset={ds}", f"output_dir={tmp_path / 't'}",
            "model.dtype=float32", "generate.threads=1", "embed.threads=1", "embed.engine=sentence",
            "constrained.k=4", "constrained.beam_width=4", "--quiet"]
    assert run(["constrained", *args]) == 0
    know = load_teacher(tmp_path / "t", load_dataset(ds))  # the students' loader accepts the folder
    assert know.topk_ids.shape == (3, 4) and know.embeddings.shape[1] == 384
    for ids, dist in zip(know.topk_ids, know.topk_dist):
        assert len(set(ids.tolist())) == 4 and all(0 <= i < len(TITLES) for i in ids)
        assert dist[0] == 0 and (np.diff(dist) >= 0).all()  # s_1 - s_k, ascending
    import json

    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert m["score_kind"] == "logprob" and m["distance"] == "logprob_gap" and set(m["metrics"]) == {"train", "valid", "test"}
    assert run(["constrained", *args]) == 0  # finished shards are skipped, the merge is redone


def test_bench_table_compares_constrained_beam_search_with_greedy():
    from teacher.bench import _table
    from teacher.config import load_teacher_config

    res = [("greedy", "transformers", 16, 40.0, 6.5), ("constrained_beam20_k20", "transformers", 4, 40.0, 6.5),
           ("embed", "transformers", 32, 8.0, 6.5), ("embed", "sentence-minilm", 32, 0.5, 0.2)]
    md = _table(res, load_teacher_config(None), (1.0,), (1.0,), 1)
    assert "| constrained_beam20_k20 | transformers | 4 | 40.00 | 0.10 | 0.25x greedy |" in md
    assert "| embed | sentence-minilm | 32 | 0.50 | 64.00 | 16.00x |" in md and "| greedy | transformers | 16 | 40.00 | 0.40 | 1.00x (ref) |" in md
