"""Constrained beam-search teacher: K distinct real items per row ranked by sequence log-probability.

``python -m teacher constrained --config ... [--rank r --world w]``: for every row of
``cfg.splits`` (this shard), the BIGRec prompt is prefilled once with the transformers model
(base + optional adapter), then the search of ``teacher.trie`` runs over the title trie with
``constrained.beam_width`` beams sharing the prompt's KV cache; the ground-truth title rides
along as one forced extra sequence, so its log-probability is known even when it is not in the
list. ``constrained.batch_prompts`` prompts are searched together (``teacher.beam_batch``: one
model call per step for all their beams, the LM head only on the tokens the trie allows) with
``constrained.attention`` (transformers' attention for the prefill; see ``ConstrainedConfig``).
Output per shard: ``work/constrained/<split>/part-*.parquet`` + ``.done`` (fingerprinted).
``merge_constrained(cfg)`` (``--merge``, automatic when world == 1) writes the teacher folder
(schema ``dllm2rec.teacher/1``) with the columns of ``teacher/artifacts.py``:

- ``topk_ids``: the K items, best first; ``topk_scores`` = their sequence log-probabilities
  (nats, descending, <= 0); ``topk_dist`` = ``s_1 - s_k`` (>= 0, ascending; 0 for the top item):
  score kind ``logprob`` mapped as ``teacher import`` maps it, so the official RD confidence
  ``exp(-d_k)`` normalised over the K candidates is the model's ``p_k / sum_j p_j``;
- ``gt_dist`` = ``max(s_1 - s_gt, 0)`` with ``s_gt`` the log-probability of the ground-truth
  title; ``generated`` = the best title;
- ``target_rank`` = 1-based position of the target in the list, or K + 1 when it is not in it
  (so HR/NDCG@k are exact for k <= K; the manifest's metrics stop at K).
- ``item_embeddings.safetensors`` from ``embed.engine`` over the titles (ED needs them).
"""
from __future__ import annotations

import time

import numpy as np

from teacher.config import split_limits
from teacher.shards import fingerprint

SCORE_KIND = "logprob"


def constrained_fingerprint(cfg, data) -> str:
    return fingerprint("constrained", cfg.model.base, cfg.model.adapter, cfg.model.dtype, vars(cfg.constrained),
                       data.id_map_hash, data.domain, split_limits(cfg))


class HFStepper:
    """Binds ``trie_beam_search``'s ``step`` to a transformers causal LM and one prompt's KV cache.

    State: the cache (rows = the sequences of the previous call). ``step(parents, tokens)``
    reorders the cache rows by ``parents`` (index_select; the prompt's single row is repeated on
    the first call) and feeds one token per row. No padding, so positions follow the cache length.
    """

    def __init__(self, model, prompt_ids):
        import torch

        self.model = model
        with torch.inference_mode():
            out = model(input_ids=torch.as_tensor([list(prompt_ids)], device=model.device), use_cache=True)
        self.cache = out.past_key_values
        self.first_logits = out.logits[0, -1].float().cpu().numpy()

    def __call__(self, parents, tokens):
        import torch

        dev = self.model.device
        with torch.inference_mode():
            self.cache.reorder_cache(torch.as_tensor(parents, device=dev))
            out = self.model(input_ids=torch.as_tensor(tokens, device=dev)[:, None], past_key_values=self.cache,
                             use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float().cpu().numpy()


def rank_rows(model, tokenizer, trie, seqs, prompts, targets, k: int, beam_width: int, length_penalty: float):
    """Beam search for each prompt, one prompt at a time with the full LM head (the path before
    issue 16; ``teacher bench --compare --only constrained`` times it against ``rank_rows_batched``).
    Returns ids int64 [R, k], their log-probs float32 [R, k] (descending), the target's log-prob
    float32 [R] and its 1-based rank (k + 1 if absent) [R]."""
    from teacher.trie import trie_beam_search

    results = []
    for prompt, target in zip(prompts, targets):
        stepper = HFStepper(model, tokenizer(prompt)["input_ids"])
        results.append(trie_beam_search(stepper.first_logits, stepper, trie, k, beam_width, length_penalty,
                                        force=seqs[int(target)]))
    return _pack(results, targets, k)


def rank_rows_batched(model, tokenizer, trie, seqs, prompts, targets, k: int, beam_width: int,
                      length_penalty: float, batch_prompts: int):
    """``rank_rows`` with ``batch_prompts`` prompts per batched search (``teacher.beam_batch``: one
    model call per step for all their beams, LM head only on the tokens the trie allows)."""
    from teacher.beam_batch import batched_beam_search

    results = []
    for s in range(0, len(prompts), batch_prompts):
        ids = [tokenizer(p)["input_ids"] for p in prompts[s:s + batch_prompts]]
        forces = [seqs[int(t)] for t in targets[s:s + batch_prompts]]
        results += batched_beam_search(model, ids, trie, k, beam_width, length_penalty, forces)
    return _pack(results, targets, k)


def _pack(results: list[dict], targets, k: int):
    ids = np.empty((len(results), k), np.int64)
    dist = np.empty((len(results), k), np.float32)
    gt = np.empty(len(results), np.float32)
    ranks = np.empty(len(results), np.int64)
    for i, (res, target) in enumerate(zip(results, targets)):
        if len(res["items"]) < k:
            raise ValueError(f"beam search found {len(res['items'])} < {k} items; raise constrained.beam_width")
        ids[i] = res["items"]
        dist[i] = res["logp"]  # raw sequence log-probabilities; rank_rows' caller maps them to d
        gt[i] = res["forced_logp"]
        hit = np.flatnonzero(res["items"] == int(target))
        ranks[i] = hit[0] + 1 if len(hit) else k + 1
    return ids, dist, gt, ranks


def constrained_phase(cfg, rank: int, world: int, progress: bool = True) -> dict:
    """Rank this shard of every split by constrained beam search; finished shards are skipped."""
    import pyarrow as pa
    from tqdm import tqdm

    from teacher.artifacts import load_teacher_data, split_prompts, work_dir, write_parquet
    from teacher.ground import _list_column
    from teacher.model import generation_model, load_hf_model, load_tokenizer
    from teacher.shards import mark_done, part, pending, shard_slice
    from teacher.trie import build_title_trie

    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    fp = constrained_fingerprint(cfg, data)
    work = work_dir(cfg)
    todo, stats = pending(work, "constrained", cfg.splits, rank, world, fp)
    if not todo:
        return stats
    path, lora = generation_model(cfg)
    if cfg.generate.threads:
        import torch

        torch.set_num_threads(cfg.generate.threads)
    model = load_hf_model(path, cfg.model.dtype, adapter=lora)
    c = cfg.constrained
    model.set_attn_implementation(c.attention)
    tok = load_tokenizer(path)
    trie, seqs = build_title_trie(tok, data.titles)
    for split in todo:
        rows = data.splits[split]
        sl = shard_slice(len(rows["row_id"]), rank, world)
        prompts, targets = split_prompts(data, split, sl), rows["target"][sl]
        t0 = time.perf_counter()
        out = [], [], [], []
        step = max(16, c.batch_prompts)
        for s in tqdm(range(0, len(prompts), step), desc=f"constrained[{split}]", disable=not progress, unit=f"x{step}"):
            for acc, arr in zip(out, rank_rows_batched(model, tok, trie, seqs, prompts[s:s + step], targets[s:s + step],
                                                       c.k, c.beam_width, c.length_penalty, c.batch_prompts)):
                acc.append(arr)
        ids, logp, gt_logp, ranks = (np.concatenate(a) if a else np.zeros((0, c.k) if j < 2 else 0) for j, a in enumerate(out))
        secs = time.perf_counter() - t0
        logp = logp.reshape(-1, c.k)
        # score kind logprob -> distance-like d_k = s_1 - s_k (0 for the top item), as teacher
        # import does: the official RD confidence exp(-d_k) normalised = p_k / sum_j p_j
        top = logp[:, :1] if len(logp) else np.zeros((0, 1))
        dist = top - logp
        gt = np.maximum(top[:, 0] - gt_logp, 0.0) if len(logp) else np.zeros(0)
        table = pa.table({
            "row_id": pa.array(rows["row_id"][sl], pa.int64()),
            "generated": pa.array([data.titles[int(r[0])] for r in ids], pa.string()),
            "topk_ids": _list_column(ids.reshape(-1, c.k).astype(np.int32)),
            "topk_dist": _list_column(dist.astype(np.float32)),
            "topk_scores": _list_column(logp.astype(np.float32)),
            "gt_dist": pa.array(np.asarray(gt, np.float32), pa.float32()),
            "target_rank": pa.array(np.asarray(ranks, np.int64), pa.int64()),
        })
        p = part(work, "constrained", split, rank, world)
        write_parquet(table, p.path("parquet"))
        mark_done(p, fp, rows=len(prompts), seconds=round(secs, 3))
        stats["done"].append({"split": split, "rows": len(prompts), "seconds": round(secs, 3),
                              "rows_per_s": round(len(prompts) / secs, 3) if secs > 0 else None})
    return stats


def merge_constrained(cfg, progress: bool = True) -> dict:
    """Teacher folder from the finished ``constrained`` shards + item embeddings of ``embed.engine``."""
    from pathlib import Path

    from dllm2rec.atomic import write_manifest
    from dllm2rec.eval.metrics import metrics_from_ranks
    from teacher.artifacts import SCHEMA, _concat_parts, load_teacher_data, work_dir, write_parquet, write_tensors
    from teacher.embed import build_embedder

    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    work, out = work_dir(cfg), Path(cfg.output_dir)
    (out / "manifest.json").unlink(missing_ok=True)
    fp = constrained_fingerprint(cfg, data)
    k = cfg.constrained.k
    counts, metrics = {}, {}
    for split in cfg.splits:
        table = _concat_parts(work, "constrained", split, fp, np.sort(data.splits[split]["row_id"]))
        write_parquet(table, out / f"rank_{split}.parquet")
        counts[split] = table.num_rows
        metrics[split] = metrics_from_ranks(table.column("target_rank").to_numpy(), [x for x in cfg.ground.ks if x <= k])
    items = build_embedder(cfg, progress)(list(data.titles))
    store = np.float16 if cfg.embed.store_dtype == "float16" else np.float32
    write_tensors({"embeddings": items.astype(store)}, out / "item_embeddings.safetensors")
    manifest = {
        "base_model": cfg.model.base, "adapter": cfg.model.adapter or None,
        "engine": {"generate": "hf", "embed": cfg.embed.engine, "dtype": cfg.model.dtype},
        "decoding": {"mode": "constrained_beam", "beam_width": cfg.constrained.beam_width,
                     "length_penalty": cfg.constrained.length_penalty, "ghost_tokens": "log-prob 0, not counted"},
        "score_kind": SCORE_KIND,
        "distance": "logprob_gap",  # topk_dist = s_1 - s_k, gt_dist = max(s_1 - s_gt, 0); scores in topk_scores
        "pooling": "mean" if cfg.embed.engine == "sentence" else "last",
        "normalized": cfg.embed.engine == "sentence",
        "collaborative": False,
        "top_n": k, "emb_dim": int(items.shape[1]), "emb_dtype": cfg.embed.store_dtype, "n_items": data.n_items,
        "id_map_hash": data.id_map_hash, "dataset": str(data.path), "splits": counts, "limit": split_limits(cfg),
        "metrics": metrics, "target_rank": f"position in the top {k}, {k + 1} = not in the list",
    }
    write_manifest(out, {"schema": SCHEMA, **manifest})
    return manifest
