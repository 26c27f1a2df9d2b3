"""Constrained decoding to real catalogue items: a token prefix trie and the search over it.

- ``TitleTrie(sequences, item_ids)``: prefix trie over token sequences (one per item; items with
  identical token sequences share one leaf). ``build_title_trie(tokenizer, titles)`` uses the
  answer text of the BIGRec template, ``'"<title>"'`` tokenised alone, + EOS, so a path from the
  root to a leaf is exactly one catalogue title followed by the end of the answer.
- ``TrieLogitsProcessor(trie, prompt_len, eos_id)``: a transformers ``LogitsProcessor`` for
  ``model.generate`` (greedy or beam): every token after the prompt must continue a catalogue
  title; after a complete title only EOS is allowed. So any output decodes to a real title.
- ``trie_beam_search(first_logits, step, trie, k, beam_width, length_penalty, force)``: beam
  search returning up to ``k`` DISTINCT items ranked by sequence log-probability, model-agnostic
  (``step`` advances the model; ``teacher.constrained`` binds it to a transformers KV cache).
  ``trie_beam_steps`` is the same search as a generator that asks for one model call at a time and
  reads only the logits of the trie's allowed tokens, so ``teacher.beam_batch`` can run many
  prompts' searches through one batched model call per step.

Scores (D3, "Decoding Matters", Bao et al. 2024): each step's log-probabilities are renormalised
over the tokens the trie allows (a log-softmax over the allowed logits), so a token the trie
forces (one child) has log-probability exactly 0: these "ghost" tokens neither lower the score
nor count in its length. ``score = logp / max(1, n_branching) ** length_penalty`` with
``n_branching`` the number of steps where the trie offered a choice; ``length_penalty = 0``
(default) ranks by the plain sequence log-probability.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


class TitleTrie:
    """Prefix trie; node 0 is the root. Leaves hold the item ids whose sequence ends there."""

    def __init__(self, sequences: Sequence[Sequence[int]], item_ids: Sequence[int]):
        if len(sequences) != len(item_ids):
            raise ValueError(f"{len(sequences)} sequences for {len(item_ids)} items")
        self.children: list[dict[int, int]] = [{}]
        self.items: list[list[int]] = [[]]
        for seq, item in zip(sequences, item_ids):
            if not len(seq):
                raise ValueError(f"item {item}: empty token sequence")
            node = 0
            for tok in seq:
                if self.items[node]:
                    raise ValueError(f"item {item}: another item's sequence is a prefix of its own (end sequences with EOS)")
                nxt = self.children[node].get(int(tok))
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][int(tok)] = nxt
                    self.children.append({})
                    self.items.append([])
                node = nxt
            if self.children[node]:
                raise ValueError(f"item {item}: its sequence is a prefix of another (end sequences with EOS)")
            self.items[node].append(int(item))
        self.depth = max((len(s) for s in sequences), default=0)

    def allowed(self, node: int) -> list[int]:
        return list(self.children[node])

    def child(self, node: int, token: int) -> int | None:
        return self.children[node].get(int(token))

    def is_leaf(self, node: int) -> bool:
        return not self.children[node]

    def walk(self, tokens: Sequence[int]) -> int | None:
        """The node reached by ``tokens`` from the root, or None when they leave the trie."""
        node = 0
        for t in tokens:
            node = self.children[node].get(int(t))
            if node is None:
                return None
        return node

    def leaf_items(self, tokens: Sequence[int]) -> list[int]:
        node = self.walk(tokens)
        return [] if node is None else list(self.items[node])


def build_title_trie(tokenizer, titles: Sequence[str]) -> tuple[TitleTrie, list[list[int]]]:
    """Trie over ``'"<title>"' + EOS`` for every title (ids = positions); also returns the sequences."""
    from teacher.prompts import answer_text

    eos = tokenizer.eos_token_id
    seqs = [list(tokenizer(answer_text(t), add_special_tokens=False)["input_ids"]) + [eos] for t in titles]
    return TitleTrie(seqs, list(range(len(titles)))), seqs


class TrieLogitsProcessor:
    """transformers ``LogitsProcessor``: only trie continuations after ``prompt_len``; EOS after a title.

    ``input_ids`` rows are the (left-padded) prompt + the tokens generated so far; all rows share
    ``prompt_len`` (the padded prompt width). Rows whose generation already left the trie (cannot
    happen under this processor) and finished rows get only ``eos_id``.
    """

    def __init__(self, trie: TitleTrie, prompt_len: int, eos_id: int):
        self.trie, self.prompt_len, self.eos_id = trie, prompt_len, eos_id

    def __call__(self, input_ids, scores):
        import torch

        mask = torch.full_like(scores, float("-inf"))
        for b, row in enumerate(input_ids[:, self.prompt_len:].tolist()):
            node = self.trie.walk(row)
            allowed = [self.eos_id] if node is None or self.trie.is_leaf(node) else self.trie.allowed(node)
            mask[b, allowed] = 0.0
        return scores + mask


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def trie_beam_search(first_logits: np.ndarray, step: Callable, trie: TitleTrie, k: int, beam_width: int,
                     length_penalty: float = 0.0, force: Sequence[int] | None = None) -> dict:
    """Beam search over ``trie``; up to ``k`` distinct items, best first (one prompt, dense logits).

    ``first_logits``: float [V], the model's next-token logits after the prompt.
    ``step(parents, tokens) -> float [len(parents), V]``: extends sequence ``parents[i]`` (a row of
    the previous call's output; row 0 = the prompt on the first call) by ``tokens[i]`` and returns
    the next-token logits of every extended sequence.
    ``force``: token path of one extra sequence (e.g. the ground-truth title) scored alongside,
    through the same renormalised log-probabilities; its log-prob is returned as ``forced_logp``.
    Returns ``items`` int64 [n <= k], ``logp`` float64 [n] (sequence log-probability),
    ``score`` float64 [n] (ranking score, descending), ``forced_logp`` (float or None), ``steps``.
    The search itself is ``trie_beam_steps``; this drives it with one dense ``step`` per call.
    """
    gen = trie_beam_steps(np.asarray(first_logits, np.float64)[trie.allowed(0)], trie, k, beam_width,
                          length_penalty, force)
    try:
        parents, tokens, nodes = next(gen)
        while True:
            dense = np.asarray(step(parents, tokens), np.float64)
            parents, tokens, nodes = gen.send([dense[i, trie.allowed(n)] for i, n in enumerate(nodes)])
    except StopIteration as stop:
        return stop.value


def trie_beam_steps(first: np.ndarray, trie: TitleTrie, k: int, beam_width: int, length_penalty: float = 0.0,
                    force: Sequence[int] | None = None):
    """The search of ``trie_beam_search`` as a generator, so that a caller can batch many searches.

    ``first``: float [len(trie.allowed(0))], the prompt's next-token logits at the root's children
    (in ``trie.allowed(0)`` order). Each ``yield`` asks for one model call: ``(parents, tokens,
    nodes)``, row i extends row ``parents[i]`` of the previous call (row 0 = the prompt on the first
    call) by ``tokens[i]`` and sits at trie node ``nodes[i]``; the caller sends back a list with,
    per row, the logits of ``trie.allowed(nodes[i])`` in that order (only those are ever read: the
    log-probabilities are renormalised over them). The generator's return value (StopIteration.value)
    is ``trie_beam_search``'s result dict.
    """
    if beam_width < 1 or k < 1:
        raise ValueError("k and beam_width must be >= 1")
    beams = [(0, 0.0, 0)]  # (trie node, logp, branching steps)
    rows = [np.asarray(first, np.float64)]  # per row of the last call: logits of its node's children
    f_node, f_logp, f_pos = (0, 0.0, 0) if force else (None, None, 0)
    finished: list[tuple[float, float, int]] = []  # (score, logp, leaf)
    steps = 0
    while beams or (force and f_pos < len(force)):
        cands = []
        for b, (node, lp, nb) in enumerate(beams):
            allowed = trie.allowed(node)
            lsm = _log_softmax(rows[b])
            branch = int(len(allowed) > 1)
            cands.extend((lp + float(l), b, t, nb + branch) for t, l in zip(allowed, lsm))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        new = []
        for lp, b, t, nb in cands:
            child = trie.child(beams[b][0], t)
            if trie.is_leaf(child):
                finished.append((lp / max(1, nb) ** length_penalty, lp, child))
            elif len(new) < beam_width:
                new.append((child, lp, nb, b, t))
        parents, tokens = [n[3] for n in new], [n[4] for n in new]
        f_row = None
        if force and f_pos < len(force):  # the forced path rides along as the last row
            allowed = trie.allowed(f_node)
            row = rows[len(beams)] if steps else rows[0]
            f_logp += float(_log_softmax(row)[allowed.index(force[f_pos])])
            f_node = trie.child(f_node, force[f_pos])
            f_pos += 1
            if f_pos < len(force):
                f_row = len(beams) if steps else 0
        if len(finished) >= k and new:
            kth = sorted(finished, reverse=True)[k - 1][1]
            if length_penalty == 0 and new[0][1] <= kth:  # log-probs only fall: nothing can overtake
                new, parents, tokens = [], [], []
        beams = [(c, lp, nb) for c, lp, nb, _, _ in new]
        nodes = [c for c, _, _ in beams]
        if f_row is not None:
            parents, tokens, nodes = parents + [f_row], tokens + [force[f_pos - 1]], nodes + [f_node]
        if not parents:
            break
        rows = [np.asarray(r, np.float64) for r in (yield parents, tokens, nodes)]
        steps += 1
    finished.sort(key=lambda f: (-f[0], f[2]))
    items, logp, score = [], [], []
    for sc, lp, leaf in finished:
        for item in trie.items[leaf]:
            if len(items) < k:
                items.append(item)
                logp.append(lp)
                score.append(sc)
    return {"items": np.asarray(items, np.int64), "logp": np.asarray(logp), "score": np.asarray(score),
            "forced_logp": f_logp, "steps": steps}
