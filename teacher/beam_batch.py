"""Constrained beam search for many prompts at once (issue 16: the teacher's CPU throughput).

``teacher.constrained.rank_rows`` runs one prompt at a time: every step is a model call on ~21
rows (20 beams + the forced ground-truth title) that reads all the weights for a handful of
tokens, and computes the full 49,152-token LM head although the search reads only the few tokens
the title trie allows. Here:

- ``BatchedLM(model, prompts)`` prefills several prompts together (left-padded, with an attention
  mask and per-row positions) and then advances every beam of every prompt in ONE model call per
  step; rows follow their parents by global row index, so searches that finish simply stop
  contributing rows. For Llama models (SmolLM2) the step is ``_llama_step``: each prompt's keys
  and values are kept once and only the generated tokens per row, because reordering and growing
  a transformers cache whose rows all hold the ~200-token prompt made the batched search SLOWER
  than one prompt at a time (an ad-hoc cProfile: cache copies dominated). Other architectures use
  transformers' forward with its cache reordered each step.
- ``BatchedLM.logits(hidden, allowed)`` applies the LM head only to the union of the tokens the
  rows' trie nodes allow (a gather of those rows of the head's weight): same products for the
  columns that are read, a fraction of the work. Models whose head is not a plain ``nn.Linear``
  on the decoder output (logit scaling or soft-capping) use the full head instead.
- ``batched_beam_search`` drives one ``teacher.trie.trie_beam_steps`` generator per prompt.

Results equal the one-prompt search up to floating-point rounding (padding and batching change
the kernels' shapes); ``tests/test_teacher_beam_batch.py`` checks items and log-probabilities
against ``HFStepper``. The bench pair ``python -m teacher bench --compare --only constrained``
measures old vs new side by side.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Architectures whose logits are exactly ``lm_head(decoder output)`` (no scaling / soft-capping),
# so gathering rows of the head's weight gives the same columns as the full head.
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}


class BatchedLM:
    """A causal LM with a KV cache over several prompts' beams; rows = the sequences of the last call.

    ``prompts``: token ids per prompt (any lengths). After construction the cache holds one row per
    prompt (row p = prompt p) and ``first`` the hidden state after each prompt, Float[P, H].
    ``step(parents, tokens, owner)`` -> Float[R, H] hidden states: row i extends row ``parents[i]``
    of the previous call by ``tokens[i]``; ``owner[i]`` is its prompt (for its padding mask and
    position). Every call appends one token to every row, so all rows share one generated length.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], fast_llama: bool = True):
        import torch

        self.model = model
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.plain_head = (getattr(model.config, "model_type", None) in PLAIN_HEAD_TYPES
                           and type(self.head) is torch.nn.Linear)
        dev = model.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=dev)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):  # left padding: the last column is every prompt's last token
            ids[i, width - len(p):] = torch.as_tensor(list(p), device=dev)
            self.mask[i, width - len(p):] = 1
        self.lengths = self.mask.sum(1)
        self.generated = 0
        with torch.inference_mode():
            out = self.body(input_ids=ids, attention_mask=self.mask,
                            position_ids=(self.mask.cumsum(1) - 1).clamp_min(0), use_cache=True)
        self.cache = out.past_key_values
        self.first = out.last_hidden_state[:, -1]
        self.shared_prefix = fast_llama and getattr(model.config, "model_type", None) == "llama"
        if self.shared_prefix:
            # Each prompt's keys/values are kept ONCE ([P, kv_heads, L, d]); only the generated
            # tokens are kept per row (see ``_llama_step``), so no step copies the prompt cache.
            self.prefix = [(layer.keys, layer.values) for layer in self.cache.layers]
            self.pad_bias = torch.zeros(self.mask.shape, dtype=self.first.dtype, device=dev).masked_fill(
                self.mask == 0, torch.finfo(self.first.dtype).min)
            self.gen: list | None = None
            self.cache = None

    def step(self, parents: Sequence[int], tokens: Sequence[int], owner: Sequence[int]):
        import torch

        if self.shared_prefix:
            return self._llama_step(parents, tokens, owner)
        dev = self.model.device
        owner_t = torch.as_tensor(owner, device=dev)
        self.generated += 1
        mask = torch.cat([self.mask[owner_t], torch.ones((len(owner), self.generated), dtype=torch.long, device=dev)], 1)
        with torch.inference_mode():
            self.cache.reorder_cache(torch.as_tensor(parents, device=dev))
            out = self.body(input_ids=torch.as_tensor(tokens, device=dev)[:, None], attention_mask=mask,
                            position_ids=(self.lengths[owner_t] + self.generated - 1)[:, None],
                            past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.last_hidden_state[:, -1]

    def _llama_step(self, parents, tokens, owner):
        """One decoding step of a Llama decoder with the shared-prefix cache (``fast_llama``).

        The layers' own modules (norms, projections, rotary embedding, MLP) run as in
        ``LlamaDecoderLayer``; only attention differs in layout: per layer, scores against the
        prompt's keys are one batched product over prompts (rows placed in slots [P, S]), scores
        against the row's generated keys a per-row product, and one softmax covers both (fp32, as
        transformers' eager attention)."""
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        dev = self.model.device
        owner_t = torch.as_tensor(owner, device=dev)
        parents_t = torch.as_tensor(parents, device=dev)
        rows, n_prompts = len(owner), self.mask.shape[0]
        starts = {}
        for i, p in enumerate(owner):  # rows of one prompt are contiguous
            starts.setdefault(p, i)
        slot = torch.as_tensor([i - starts[p] for i, p in enumerate(owner)], device=dev)
        n_slots = int(slot.max()) + 1
        flat = owner_t * n_slots + slot
        self.generated += 1
        with torch.inference_mode():
            h = self.body.embed_tokens(torch.as_tensor(tokens, device=dev)[:, None])  # [R, 1, H]
            pos = (self.lengths[owner_t] + self.generated - 1)[:, None]
            cos, sin = self.body.rotary_emb(h, pos)
            bias = self.pad_bias[owner_t][:, None, None, :]  # [R, 1, 1, L]
            new_gen = []
            for li, layer in enumerate(self.body.layers):
                att = layer.self_attn
                x = layer.input_layernorm(h)
                d = att.head_dim
                q = att.q_proj(x).view(rows, 1, -1, d).transpose(1, 2)  # [R, nh, 1, d]
                k = att.k_proj(x).view(rows, 1, -1, d).transpose(1, 2)  # [R, kvh, 1, d]
                v = att.v_proj(x).view(rows, 1, -1, d).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                kvh = k.shape[1]
                g = q.shape[1] // kvh
                if self.gen is None:
                    gk, gv = k, v
                else:
                    gk = torch.cat([self.gen[li][0].index_select(0, parents_t), k], 2)  # [R, kvh, t, d]
                    gv = torch.cat([self.gen[li][1].index_select(0, parents_t), v], 2)
                new_gen.append((gk, gv))
                pk, pv = self.prefix[li]  # [P, kvh, L, d]
                qg = q.reshape(rows, kvh, g, d)
                slots = q.new_zeros((n_prompts * n_slots, kvh, g, d))
                slots[flat] = qg
                slots = slots.view(n_prompts, n_slots, kvh, g, d).transpose(1, 2).reshape(n_prompts, kvh, n_slots * g, d)
                sp = torch.matmul(slots, pk.transpose(2, 3))  # [P, kvh, S*g, L]
                sp = sp.view(n_prompts, kvh, n_slots, g, -1).transpose(1, 2).reshape(n_prompts * n_slots, kvh, g, -1)[flat]
                sg = torch.matmul(qg, gk.transpose(2, 3))  # [R, kvh, g, t]
                w = torch.cat([sp * att.scaling + bias, sg * att.scaling], -1)
                w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
                wp, wg = w.split([pk.shape[2], gk.shape[2]], -1)
                slots = wp.new_zeros((n_prompts * n_slots, kvh, g, wp.shape[-1]))
                slots[flat] = wp
                slots = slots.view(n_prompts, n_slots, kvh, g, -1).transpose(1, 2).reshape(n_prompts, kvh, n_slots * g, -1)
                op = torch.matmul(slots, pv)  # [P, kvh, S*g, d]
                op = op.view(n_prompts, kvh, n_slots, g, d).transpose(1, 2).reshape(n_prompts * n_slots, kvh, g, d)[flat]
                o = (op + torch.matmul(wg, gv)).reshape(rows, 1, -1)
                h = h + att.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            self.gen = new_gen
            return self.body.norm(h)[:, -1]

    def logits(self, hidden, allowed: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per row i, float64 logits of the tokens ``allowed[i]`` (in that order) from hidden Float[R, H]."""
        import torch

        with torch.inference_mode():
            if not self.plain_head:
                full = self.head(hidden).float().cpu().numpy().astype(np.float64)
                return [full[i, list(a)] for i, a in enumerate(allowed)]
            vocab = np.unique(np.concatenate([np.asarray(a, np.int64) for a in allowed]))
            rows = torch.as_tensor(vocab, device=hidden.device)
            bias = None if self.head.bias is None else self.head.bias[rows]
            out = torch.nn.functional.linear(hidden, self.head.weight[rows], bias)
        out = out.float().cpu().numpy().astype(np.float64)
        return [out[i, np.searchsorted(vocab, a)] for i, a in enumerate(allowed)]


def batched_beam_search(model, prompts: Sequence[Sequence[int]], trie, k: int, beam_width: int,
                        length_penalty: float = 0.0, forces: Sequence[Sequence[int] | None] | None = None,
                        fast_llama: bool = True) -> list[dict]:
    """``trie_beam_search`` for every prompt, all prompts' beams in one model call per step.

    ``forces[p]``: the forced token path of prompt p (or None). Returns one result dict per prompt
    (the keys of ``teacher.trie.trie_beam_search``). ``fast_llama``: Llama models decode with the
    shared-prefix cache (``BatchedLM._llama_step``); False (or another architecture) uses
    transformers' own forward with a cache whose rows are reordered every step."""
    from teacher.trie import trie_beam_steps

    forces = list(forces) if forces is not None else [None] * len(prompts)
    lm = BatchedLM(model, prompts, fast_llama)
    root = trie.allowed(0)
    first = lm.logits(lm.first, [root] * len(prompts))
    gens = [trie_beam_steps(first[p], trie, k, beam_width, length_penalty, forces[p]) for p in range(len(prompts))]
    results: list[dict | None] = [None] * len(prompts)
    requests, offset = {}, {}
    for p, gen in enumerate(gens):
        try:
            requests[p] = next(gen)
            offset[p] = p  # the search's row 0 = prompt p's row of the prefill
        except StopIteration as stop:
            results[p] = stop.value
    while requests:
        parents, tokens, owner, allowed, spans = [], [], [], [], []
        for p, (par, tok, nodes) in requests.items():
            start = len(parents)
            parents += [offset[p] + i for i in par]
            tokens += list(tok)
            owner += [p] * len(tok)
            allowed += [trie.allowed(n) for n in nodes]
            spans.append((p, start, len(parents)))
        rows = lm.logits(lm.step(parents, tokens, owner), allowed)
        requests = {}
        for p, a, b in spans:
            offset[p] = a
            try:
                requests[p] = gens[p].send(rows[a:b])
            except StopIteration as stop:
                results[p] = stop.value
    return results
