"""Embeddings with the BASE model (never the LoRA): last layer, last token, NOT normalised.

- ``vllm_embed(llm, texts, batch_size)``: a vLLM pooling engine (``runner="pooling"``,
  ``convert="embed"``, ``PoolerConfig(pooling_type="LAST", use_activation=False)``, built by
  ``teacher.model.vllm_engine(..., runner="pooling")``).
- ``hf_embed(model, tokenizer, texts, batch_size)``: transformers reference,
  ``output_hidden_states=True``, last layer at the last non-pad token (right padding).
- ``embed.engine: sentence``: a sentence encoder instead of the LLM (``teacher.sentence``,
  all-MiniLM-L6-v2 by default: mean pooling, L2-normalised, 384-d).
All return float32 ``[len(texts), d]``. A text is embedded alone (no prompt). An empty text
(the model produced no answer) is embedded as ``'""'`` so that every row gets a vector.

``embed_phase(cfg, rank, world)``: the sharded, resumable phase (items only for a history-query
teacher, ``query.kind != generated``). It writes
``work/embed/items/part-*.safetensors`` (``ids`` int64 [n], ``embeddings`` float32 [n, d]) for this
shard of the item titles and ``work/embed/<split>/part-*.safetensors`` (``row_id``, ``embeddings``)
for this shard of every split's generated texts (needs the same shard's generate part).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from teacher.config import split_limits
from teacher.fingerprints import embed_fingerprint, generate_fingerprint

EMPTY_TEXT = '""'


def _clean(texts: Sequence[str]) -> list[str]:
    return [t if t.strip() else EMPTY_TEXT for t in texts]


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not progress, mininterval=2.0)


def vllm_embed(llm, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
    texts = _clean(texts)
    out = []
    with _bar(len(texts), "embed[vllm]", progress) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            res = llm.embed(chunk, use_tqdm=False)
            out.append(np.asarray([r.outputs.embedding for r in res], dtype=np.float32))
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def hf_embed(model, tokenizer, texts: Sequence[str], batch_size: int = 16, progress: bool = True) -> np.ndarray:
    import torch

    texts = _clean(texts)
    tokenizer.padding_side = "right"
    out = []
    with _bar(len(texts), "embed[hf]", progress) as bar, torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1]  # [B, T, d], after final norm
            last = enc["attention_mask"].sum(dim=1) - 1  # right padding: last real token
            vec = hidden[torch.arange(hidden.shape[0]), last]
            out.append(vec.float().cpu().numpy())
            bar.update(vec.shape[0])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_unique(run, texts: Sequence[str]) -> np.ndarray:
    """``run`` on the distinct texts only, scattered back to ``len(texts)`` rows (same order).

    A greedy teacher repeats itself (many rows share one generated title); each distinct string
    is embedded once, which is exact because the embedding is a function of the text alone.
    """
    if not texts:
        return run([])
    unique: dict[str, int] = {}
    index = np.fromiter((unique.setdefault(t, len(unique)) for t in texts), dtype=np.int64, count=len(texts))
    return run(list(unique))[index]


def build_embedder(cfg, progress: bool = True):
    """``texts -> float32 [n, d]``: the base LLM (vllm | hf, last token, raw) or, with
    ``embed.engine: sentence``, the sentence encoder ``embed.model`` (mean pooling, L2-normalised)."""
    from teacher.model import load_hf_model, load_tokenizer, resolve_base_model, vllm_engine

    e = cfg.embed
    if e.engine == "sentence":
        from teacher.sentence import load_sentence_model, mean_pool_embed, resolve_sentence_model

        if e.threads:
            import torch

            torch.set_num_threads(e.threads)
        enc, enc_tok = load_sentence_model(resolve_sentence_model(e.model))
        return lambda texts: mean_pool_embed(enc, enc_tok, _clean(texts), e.batch_size)
    base = resolve_base_model(cfg.model.base)
    if e.engine == "vllm":
        llm = vllm_engine(base, "pooling", dtype=cfg.model.dtype, threads=e.threads or None,
                          max_model_len=cfg.model.max_model_len, seed=cfg.seed)
        return lambda texts: vllm_embed(llm, texts, e.batch_size, progress)
    if e.threads:
        import torch

        torch.set_num_threads(e.threads)
    model = load_hf_model(base, cfg.model.dtype)
    tok = load_tokenizer(base, padding_side="right")
    return lambda texts: hf_embed(model, tok, texts, e.batch_size, progress)


def embed_phase(cfg, rank: int, world: int, progress: bool = True) -> dict:
    """Embed this shard of the item titles and of every split's generated texts."""
    from dllm2rec.readers import read_parquet
    from teacher.artifacts import load_teacher_data, work_dir, write_tensors
    from teacher.shards import ShardError, is_done, mark_done, part, shard_slice

    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    fp, gfp = embed_fingerprint(cfg, data), generate_fingerprint(cfg, data)
    work = work_dir(cfg)
    # history queries (teacher/query.py) are built from the item embeddings at grounding time
    names = ["items"] if cfg.query.kind != "generated" else ["items", *cfg.splits]
    todo = [s for s in names if not is_done(part(work, "embed", s, rank, world), fp)]
    stats: dict = {"skipped": [s for s in names if s not in todo], "done": []}
    if not todo:
        return stats
    for split in todo:
        if split != "items" and not is_done(part(work, "generate", split, rank, world), gfp):
            raise ShardError(f"{work}/generate/{split}: shard {rank} of {world} is not finished; run `teacher generate` first")
    run = build_embedder(cfg, progress)
    for split in todo:
        p = part(work, "embed", split, rank, world)
        t0 = time.perf_counter()
        if split == "items":
            sl = shard_slice(data.n_items, rank, world)
            ids = np.arange(data.n_items, dtype=np.int64)[sl]
            emb = run([data.titles[i] for i in ids])
            tensors = {"ids": ids, "embeddings": emb}
        else:
            gen = read_parquet(part(work, "generate", split, rank, world).path("parquet"))
            ids = gen.column("row_id").to_numpy().astype(np.int64)
            emb = embed_unique(run, gen.column("generated").to_pylist())
            tensors = {"row_id": ids, "embeddings": emb}
        if emb.shape[0] != len(ids) or (len(ids) and emb.ndim != 2):
            raise ShardError(f"{p.path('safetensors')}: embedder returned shape {emb.shape} for {len(ids)} texts")
        if len(ids) == 0:
            tensors["embeddings"] = np.zeros((0, 1), np.float32)
        write_tensors(tensors, p.path("safetensors"))
        secs = time.perf_counter() - t0
        mark_done(p, fp, rows=int(len(ids)), seconds=round(secs, 3))
        stats["done"].append({"split": split, "rows": int(len(ids)), "seconds": round(secs, 3)})
    return stats
