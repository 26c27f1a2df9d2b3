"""Teacher generation: BIGRec prompts -> recommended titles, with vLLM (default) or transformers.

- ``vllm_generate(llm, prompts, decoding, beam_width, max_new_tokens, lora=None)`` and
  ``hf_generate(model, tokenizer, prompts, ...)`` return the raw completions (prompt removed),
  one per prompt, in order. Greedy by default; ``decoding="beam"`` keeps the best of
  ``beam_width`` beams (BIGRec). Progress is a tqdm bar counting rows (rows/s).
- ``generate_phase(cfg, rank, world)``: the sharded, resumable phase; for every split writes
  ``work/generate/<split>/part-*.parquet`` with ``row_id``, ``raw`` and ``generated`` (the
  answer after ``prompts.extract_answer``), then a done marker.
"""
from __future__ import annotations

import time
from typing import Sequence

from teacher.config import split_limits
from teacher.fingerprints import generate_fingerprint
from teacher.prompts import extract_answer


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not progress, mininterval=2.0)


def vllm_generate(
    llm,
    prompts: Sequence[str],
    decoding: str = "greedy",
    beam_width: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    lora_path: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Completions from a vLLM ``LLM`` (runner "generate"); ``lora_path`` = PEFT adapter folder."""
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    lora = None
    if lora_path:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("teacher-adapter", 1, str(lora_path))
    out: list[str] = []
    with _bar(len(prompts), f"generate[vllm,{decoding}]", progress) as bar:
        for start, stop in _batches(len(prompts), batch_size):
            chunk = list(prompts[start:stop])
            if decoding == "greedy":
                params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
                res = llm.generate(chunk, params, use_tqdm=False, lora_request=lora)
                out.extend(r.outputs[0].text for r in res)
            elif decoding == "beam":
                params = BeamSearchParams(beam_width=beam_width, max_tokens=max_new_tokens)
                res = llm.beam_search([{"prompt": p} for p in chunk], params, lora_request=lora)
                # beam texts include the prompt; sequences are sorted best first.
                for p, r in zip(chunk, res):
                    text = r.sequences[0].text
                    out.append(text[len(p):] if text.startswith(p) else text)
            else:
                raise ValueError(f"decoding {decoding!r}: choose greedy or beam")
            bar.update(len(chunk))
    return out


def hf_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    decoding: str = "greedy",
    beam_width: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Reference completions from a transformers causal LM (left-padded batches, no sampling)."""
    import torch

    tokenizer.padding_side = "left"
    out: list[str] = []
    extra = {"num_beams": beam_width, "num_return_sequences": 1, "early_stopping": True} if decoding == "beam" else {}
    with _bar(len(prompts), f"generate[hf,{decoding}]", progress) as bar, torch.inference_mode():
        for start, stop in _batches(len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:stop]), return_tensors="pt", padding=True).to(model.device)
            ids = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **extra,
            )
            new = ids[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            bar.update(stop - start)
    return out


def build_generator(cfg, progress: bool = True):
    """A callable ``prompts -> completions`` for ``cfg`` (a ``TeacherConfig``), plus a description."""
    from teacher.model import generation_model, load_hf_model, load_tokenizer, lora_rank, vllm_engine

    model_path, lora = generation_model(cfg)
    g = cfg.generate
    if g.engine == "vllm":
        llm = vllm_engine(
            model_path, "generate", dtype=cfg.model.dtype, threads=g.threads or None,
            max_model_len=cfg.model.max_model_len, enable_lora=lora is not None,
            max_lora_rank=lora_rank(lora) if lora else 8, seed=cfg.seed,
        )

        def run(prompts):
            return vllm_generate(llm, prompts, g.decoding, g.beam_width, g.max_new_tokens, g.batch_size,
                                 str(lora) if lora else None, progress)
    else:
        if g.threads:
            import torch

            torch.set_num_threads(g.threads)
        model = load_hf_model(model_path, cfg.model.dtype, adapter=lora)
        tok = load_tokenizer(model_path)

        def run(prompts):
            return hf_generate(model, tok, prompts, g.decoding, g.beam_width, g.max_new_tokens, g.batch_size, progress)
    return run


def generate_phase(cfg, rank: int, world: int, progress: bool = True) -> dict:
    """Generate for this shard of every split in ``cfg.splits``; finished shards are skipped.

    A history-query teacher (``query.kind != generated``, teacher/query.py) generates nothing.
    """
    import pyarrow as pa

    if cfg.query.kind != "generated":
        return {"skipped": list(cfg.splits), "done": [], "reason": f"query.kind={cfg.query.kind}: no generation"}

    from teacher.artifacts import load_teacher_data, split_prompts, work_dir, write_parquet
    from teacher.shards import mark_done, part, pending, shard_slice

    data = load_teacher_data(cfg.dataset, split_limits(cfg))
    fp = generate_fingerprint(cfg, data)
    work = work_dir(cfg)
    todo, stats = pending(work, "generate", cfg.splits, rank, world, fp)
    if not todo:
        return stats
    run = build_generator(cfg, progress)
    for split in todo:
        rows = data.splits[split]
        sl = shard_slice(len(rows["row_id"]), rank, world)
        prompts = split_prompts(data, split, sl)
        t0 = time.perf_counter()
        raw = run(prompts)
        secs = time.perf_counter() - t0
        table = pa.table({
            "row_id": pa.array(rows["row_id"][sl], pa.int64()),
            "raw": pa.array(raw, pa.string()),
            "generated": pa.array([extract_answer(t) for t in raw], pa.string()),
        })
        p = part(work, "generate", split, rank, world)
        write_parquet(table, p.path("parquet"))
        mark_done(p, fp, rows=len(prompts), seconds=round(secs, 3))
        stats["done"].append({"split": split, "rows": len(prompts), "seconds": round(secs, 3)})
    return stats
