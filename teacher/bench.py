"""``python -m teacher bench``: vLLM vs transformers on the same prompts and model; FAISS vs torch.

Measures (median of ``repeats`` timed runs after one warm-up, engine start-up reported apart):
- greedy generation rows/s: vLLM vs transformers ``generate`` (left-padded batches);
- beam search (width ``generate.beam_width``) rows/s on a quarter of the rows;
- constrained beam search (``hf_constrained``: K distinct catalogue items per row over the title
  trie, width ``constrained.beam_width``) rows/s on a quarter of the rows, vs transformers greedy;
- embedding rows/s (item titles): vLLM pooling runner vs transformers hidden states, and the
  all-MiniLM-L6-v2 sentence encoder (``sentence_embed``) against the same transformers reference;
- grounding: FAISS IndexFlatL2 top-n vs exact ``torch.cdist`` + argsort, on a Games-sized
  catalogue (17,408 items x emb_dim, random vectors: only the timing matters here).
Prompts come from the config's dataset (first training rows). Writes a markdown table to stdout
and to ``--out``. The machine's load average is printed too: on a shared CPU it moves numbers.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ALL = ("vllm_greedy", "hf_greedy", "vllm_beam", "hf_beam", "hf_constrained", "vllm_embed", "hf_embed",
       "sentence_embed", "ground")


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels); vLLM rows clear their prefix cache inside ``fn``
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cold(llm):
    """The engine with an empty prefix cache: otherwise every timed repeat of the same prompts
    would skip prefill (a cache hit), which transformers never gets, and the ratio would be inflated."""
    llm.reset_prefix_cache()
    return llm


def _inputs(cfg, rows: int):
    from teacher.artifacts import load_teacher_data, split_prompts

    data = load_teacher_data(cfg.dataset)
    ps = split_prompts(data, "train", slice(0, rows))
    titles = data.titles[: rows * 2]
    return ps, titles, data


def run_bench(cfg, rows: int, repeats: int, out: str, only: list[str] | None = None) -> str:
    from dllm2rec.atomic import atomic_write_text
    from teacher.embed import hf_embed, vllm_embed
    from teacher.generate import hf_generate, vllm_generate
    from teacher.model import load_hf_model, load_tokenizer, resolve_base_model, vllm_engine

    only = only or list(ALL)
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        raise ValueError(f"--only: unknown measurement(s) {unknown}; choose from {ALL}")
    path = resolve_base_model(cfg.model.base)
    prompts, titles, data = _inputs(cfg, rows)
    beam_rows = prompts[: max(4, len(prompts) // 4)]
    g, dtype, threads = cfg.generate, cfg.model.dtype, cfg.generate.threads or None
    res: list[tuple[str, str, int, float, float | None]] = []  # (what, engine, rows, median s, start s)
    load0 = os.getloadavg()

    def record(what, engine, n, fn, start=None):
        secs = _timed(fn, repeats)
        res.append((what, engine, n, secs, start))
        print(f"{what:<12} {engine:<12} {n:>5} rows  {secs:8.2f} s  {n / secs:8.2f} rows/s", flush=True)

    if any(k in only for k in ("vllm_greedy", "vllm_beam")):
        t0 = time.perf_counter()
        llm = vllm_engine(path, "generate", dtype=dtype, threads=threads, max_model_len=cfg.model.max_model_len)
        start = time.perf_counter() - t0
        if "vllm_greedy" in only:
            record("greedy", "vllm", len(prompts), lambda: vllm_generate(
                _cold(llm), prompts, "greedy", max_new_tokens=g.max_new_tokens, batch_size=len(prompts), progress=False), start)
        if "vllm_beam" in only:
            record(f"beam{g.beam_width}", "vllm", len(beam_rows), lambda: vllm_generate(
                _cold(llm), beam_rows, "beam", g.beam_width, g.max_new_tokens, len(beam_rows), progress=False), start)
        del llm
        gc.collect()
    if "vllm_embed" in only:
        t0 = time.perf_counter()
        emb = vllm_engine(path, "pooling", dtype=dtype, threads=threads, max_model_len=cfg.model.max_model_len)
        start = time.perf_counter() - t0
        record("embed", "vllm", len(titles), lambda: vllm_embed(_cold(emb), titles, len(titles), progress=False), start)
        del emb
        gc.collect()
    if any(k in only for k in ("hf_greedy", "hf_beam", "hf_constrained", "hf_embed")):
        import torch

        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        model, tok = load_hf_model(path, dtype), load_tokenizer(path)
        start = time.perf_counter() - t0
        bs = min(g.batch_size, 32)
        if "hf_greedy" in only:
            record("greedy", "transformers", len(prompts), lambda: hf_generate(
                model, tok, prompts, "greedy", max_new_tokens=g.max_new_tokens, batch_size=bs, progress=False), start)
        if "hf_beam" in only:
            record(f"beam{g.beam_width}", "transformers", len(beam_rows), lambda: hf_generate(
                model, tok, beam_rows, "beam", g.beam_width, g.max_new_tokens, bs, progress=False), start)
        if "hf_constrained" in only:  # K distinct catalogue items per row (teacher/constrained.py)
            from teacher.constrained import rank_rows_batched
            from teacher.trie import build_title_trie

            trie, seqs = build_title_trie(tok, data.titles)
            c, targets = cfg.constrained, data.splits["train"]["target"][: len(beam_rows)]
            attn = model.config._attn_implementation
            model.set_attn_implementation(c.attention)  # the pipeline's path (teacher/beam_batch.py)
            record(f"constrained_beam{c.beam_width}_k{c.k}", "transformers", len(beam_rows), lambda: rank_rows_batched(
                model, tok, trie, seqs, beam_rows, targets, c.k, c.beam_width, c.length_penalty, c.batch_prompts), start)
            model.set_attn_implementation(attn)
        if "hf_embed" in only:
            record("embed", "transformers", len(titles), lambda: hf_embed(model, tok, titles, bs, progress=False), start)
    if "sentence_embed" in only:  # all-MiniLM-L6-v2, mean pooling (teacher/sentence.py)
        from teacher.sentence import load_sentence_model, mean_pool_embed, resolve_sentence_model

        t0 = time.perf_counter()
        enc, enc_tok = load_sentence_model(resolve_sentence_model(cfg.embed.model))
        start = time.perf_counter() - t0
        record("embed", "sentence-minilm", len(titles), lambda: mean_pool_embed(enc, enc_tok, titles, len(titles)), start)
    if "ground" in only:
        import faiss
        import torch

        from teacher.ground import build_index, search

        rng = np.random.default_rng(0)
        d = 576
        items = rng.normal(size=(17408, d)).astype(np.float32)
        q = rng.normal(size=(2048, d)).astype(np.float32)
        faiss.omp_set_num_threads(threads or 1)
        idx = build_index(items, "flat")
        record("ground", "faiss-flat", len(q), lambda: search(q, items, cfg.ground.top_n, built=idx))

        def torch_exact():
            for s in range(0, len(q), 512):  # chunked like the real phase; float32 cdist
                dd = torch.cdist(torch.from_numpy(q[s:s + 512]), torch.from_numpy(items))
                torch.topk(dd, cfg.ground.top_n, largest=False, sorted=True)
        record("ground", "torch-cdist", len(q), torch_exact)
    table = _table(res, cfg, load0, os.getloadavg(), repeats)
    print(table)
    atomic_write_text(Path(out), table)
    return table


def _table(res, cfg, load0, load1, repeats) -> str:
    base = {}
    for what, engine, n, secs, _ in res:
        if engine in ("transformers", "torch-cdist") and not what.startswith("constrained"):
            base[what] = n / secs
    lines = [
        f"# Teacher benchmark ({platform.machine()}, {os.cpu_count()} CPUs, dtype {cfg.model.dtype}, "
        f"threads {cfg.generate.threads}, max_new_tokens {cfg.generate.max_new_tokens}, median of {repeats})",
        "",
        f"Load average before/after: {load0[0]:.1f} / {load1[0]:.1f} (shared machine: numbers move with it).",
        "",
        "| measurement | engine | rows | median s | rows/s | vs reference | engine start s |",
        "|---|---|---|---|---|---|---|",
    ]
    for what, engine, n, secs, start in res:
        if what.startswith("constrained"):  # against transformers greedy on the same prompts
            ref = base.get("greedy")
            ratio = f"{(n / secs) / ref:.2f}x greedy" if ref else "-"
        else:
            ref = base.get(what)
            ratio = f"{(n / secs) / ref:.2f}x" if ref and engine not in ("transformers", "torch-cdist") else "1.00x (ref)" if ref else "-"
        lines.append(f"| {what} | {engine} | {n} | {secs:.2f} | {n / secs:.2f} | {ratio} | "
                     f"{'-' if start is None else f'{start:.1f}'} |")
    return "\n".join(lines) + "\n"
