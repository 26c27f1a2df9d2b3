"""``python -m teacher bench --compare``: the teacher's old vs new CPU paths, side by side.

Each pair runs ALTERNATELY in one process (old, new, old, new, ...; one untimed warm-up of each
first), so the background load of a shared machine hits both paths alike; the table reports the
median of ``repeats`` timed runs of each, the new/old throughput ratio and the load average
before and after. Every timed generation or embedding run starts from an empty vLLM prefix
cache (``reset_prefix_cache``), so repeats of the same rows do not turn into cache hits.

Pairs ("old" = the default before issue 16, "new" = the default after it):
- ``finetune``: LoRA training examples/s (forward + backward over ``micro_batch_size`` real
  BIGRec training prompts + one AdamW step per run; LoRA shape from the fine-tune config):
  fp32 vs ``torch.autocast("cpu", bfloat16)``, which is what Accelerate applies for
  ``mixed_precision: bf16``. Check: the training loss of the same batches under both.
- ``logits``: the same LoRA training step with the HF loss (LM head + float32 log-softmax at every
  position) in float32 (the default before issue 16) and in the precision the config resolves to
  vs ``teacher.lm_loss`` (only at positions that predict a trained token: the fine-tune's default
  ``logits: trained``) in that precision. With ``train_on_inputs: false`` (answer-only, the demo's
  setting) most positions drop out. Check: the losses of all paths.
- ``greedy``: greedy generation rows/s with vLLM (the config's dtype and base weights): vLLM
  called per ``generate.batch_size`` rows on an engine with vLLM's default step size (old) vs
  per ``greedy_batch`` rows, also on an engine limited to ``--step-tokens`` tokens per step
  (vLLM ``max_num_batched_tokens``) when that is given (new). Check: the extracted answers (``prompts.extract_answer``) of
  the newest vs the old path, equal rows / all rows. A last row times the newest path with
  every prompt already cached: how much of the time is prefill.
- ``embed``: title embedding rows/s with the vLLM pooling engine: float32 and the config's dtype
  in calls of ``embed.batch_size`` titles (old) vs the config's dtype in calls of
  ``embed_batch`` titles (new: fewer, fuller engine steps). Check: mean and minimum cosine
  between the new path's vectors and float32's.
- ``constrained``: constrained beam search rows/s (transformers, the config's dtype, K =
  ``constrained.k`` distinct items, width ``constrained.beam_width``): one prompt at a time with
  SDPA attention and the full LM head (``constrained.rank_rows``, the path before issue 16) vs
  ``constrained.batch_prompts`` prompts per batched search with ``constrained.attention`` and the
  LM head only on the trie's allowed tokens (``constrained.rank_rows_batched``, teacher/beam_batch.py).
  Check: rows whose K-item lists are identical, the mean overlap of the two K-item sets, equal
  top-1 items and the largest log-probability difference.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

PAIRS = ("finetune", "logits", "greedy", "embed", "constrained")


def alternate(*fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns`` run round-robin ``repeats`` times (one warm-up round first)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _lora_setup(ft, rows: int):
    """(PEFT model in fp32, collated micro-batches of ``rows`` training prompts, AdamW, n examples)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dllm2rec.data.dataset import load_dataset
    from teacher.finetune import _encode_split
    from teacher.finetune_data import collate
    from teacher.model import load_tokenizer, resolve_base_model

    if ft.threads:
        torch.set_num_threads(ft.threads)
    base = resolve_base_model(ft.base_model)
    tok = load_tokenizer(base, padding_side="right")
    examples, _ = _encode_split(ft, load_dataset(ft.dataset), tok, "train", rows, ft.seed)
    mb = ft.micro_batch_size
    batches = [collate(examples[i:i + mb], int(tok.pad_token_id)) for i in range(0, len(examples), mb)]
    torch.manual_seed(ft.seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
        LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=0.0,  # no dropout: comparable losses
                   target_modules=list(ft.target_modules), bias="none", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ft.lr)
    return model, batches, opt, len(examples)


def _train_pass(model, batches, opt, loss_of) -> None:
    """Forward + backward over every micro-batch, then one optimiser step (one timed run)."""
    for batch in batches:
        loss_of(batch).backward()
    opt.step()
    opt.zero_grad()


def _finetune_pair(ft, rows: int, repeats: int):
    """(rows, old s, new s, check) for fp32 vs bf16-autocast LoRA training steps."""
    import torch

    model, batches, opt, n = _lora_setup(ft, rows)

    def loss_of(batch, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss

    with torch.no_grad():
        model.eval()
        losses = [(float(loss_of(b, False)), float(loss_of(b, True))) for b in batches]
        model.train()
    check = "loss fp32 {:.4f} vs bf16 {:.4f}".format(*np.mean(losses, axis=0))
    old, new = alternate(lambda: _train_pass(model, batches, opt, lambda b: loss_of(b, False)),
                         lambda: _train_pass(model, batches, opt, lambda b: loss_of(b, True)), repeats=repeats)
    return n, old, new, check


def _logits_pair(ft, rows: int, repeats: int):
    """Timed LoRA training passes (same batches, alternating) for the HF loss (LM head at every
    position) in float32 (the pre-issue-16 default), the HF loss in the precision the config
    resolves to (skipped when that is float32 too), and ``teacher.lm_loss.mean_loss`` (LM head only
    where a token is trained) in that precision. Returns (rows, {label: seconds}, check, share,
    dtype); share = trained positions / all positions over the micro-batches."""
    import torch

    from teacher.lm_loss import mean_loss, predicting_positions
    from teacher.precision import resolve_mixed_precision

    model, batches, opt, n = _lora_setup(ft, rows)
    bf16 = resolve_mixed_precision(ft.mixed_precision) == "bf16"
    dt = "bf16" if bf16 else "fp32"

    def loss_fn(half: bool, trained: bool):
        def f(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                if trained:
                    return mean_loss(model, batch, "trained")
                return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
        return f

    paths = {"fp32, every position": loss_fn(False, False)}
    if bf16:
        paths[f"{dt}, every position"] = loss_fn(True, False)
    paths[f"{dt}, trained positions"] = loss_fn(bf16, True)
    with torch.no_grad():
        model.eval()
        losses = {k: np.mean([float(f(b)) for b in batches]) for k, f in paths.items()}
        model.train()
    check = "loss " + " / ".join(f"{v:.5f}" for v in losses.values())
    kept = sum(len(predicting_positions(b["labels"])) for b in batches)
    total = sum(b["labels"].shape[1] - 1 for b in batches)
    secs = alternate(*[lambda f=f: _train_pass(model, batches, opt, f) for f in paths.values()], repeats=repeats)
    return n, dict(zip(paths, secs)), check, kept / total, dt


def _greedy_pair(cfg, path, prompts, repeats: int, new_batch: int, step_tokens: int):
    """Seconds of (vLLM default engine step size, calls of ``generate.batch_size`` rows),
    (same engine, calls of ``new_batch`` rows), (engine with ``step_tokens`` tokens per step
    (vLLM ``max_num_batched_tokens``), calls of ``new_batch``; only when ``step_tokens`` > 0), then the last path once more WITHOUT
    resetting the prefix cache: every prompt a full hit, only decoding left. That is not a
    usable path (real prompts are distinct beyond the shared instruction) but it measures how
    much of the time is prefill. Plus the answer check of the last path vs the first.
    """
    from teacher.generate import vllm_generate
    from teacher.model import vllm_engine
    from teacher.prompts import extract_answer

    g, m = cfg.generate, cfg.model
    engines = {n: vllm_engine(path, "generate", dtype=m.dtype, threads=g.threads or None,
                              max_model_len=m.max_model_len, max_num_batched_tokens=n)
               for n in sorted({0, step_tokens})}
    outs: dict[tuple, list[str]] = {}

    def run(tokens, batch_size, reset=True):
        if reset:
            engines[tokens].reset_prefix_cache()
        outs[tokens, batch_size] = vllm_generate(engines[tokens], prompts, "greedy", max_new_tokens=g.max_new_tokens,
                                                 batch_size=batch_size, progress=False)

    paths = [(0, g.batch_size), (0, new_batch)] + ([(step_tokens, new_batch)] if step_tokens else [])
    secs = alternate(*[lambda p=p: run(*p) for p in paths], repeats=repeats)
    cached = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(*paths[-1], reset=False)
        cached.append(time.perf_counter() - t0)
    same = sum(extract_answer(a) == extract_answer(b) for a, b in zip(outs[paths[0]], outs[paths[-1]]))
    engines.clear()
    gc.collect()
    return secs, statistics.median(cached), f"same answer {same}/{len(prompts)} rows"


def _embed_pair(cfg, path, titles, repeats: int, new_batch: int):
    """Seconds of (float32, calls of ``embed.batch_size``), (config dtype, same calls) and
    (config dtype, calls of ``new_batch``), plus the cosine check of the new path vs float32."""
    from teacher.embed import vllm_embed
    from teacher.model import vllm_engine

    e, dt = cfg.embed, cfg.model.dtype
    engines = {d: vllm_engine(path, "pooling", dtype=d, threads=e.threads or None,
                              max_model_len=cfg.model.max_model_len) for d in ("float32", dt)}
    outs: dict[tuple, np.ndarray] = {}

    def run(dtype, batch):
        engines[dtype].reset_prefix_cache()
        outs[dtype, batch] = vllm_embed(engines[dtype], titles, batch, progress=False)

    secs = alternate(lambda: run("float32", e.batch_size), lambda: run(dt, e.batch_size),
                     lambda: run(dt, new_batch), repeats=repeats)
    a, b = outs["float32", e.batch_size], outs[dt, new_batch]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    engines.clear()
    gc.collect()
    return secs, f"cosine vs float32 mean {cos.mean():.4f} min {cos.min():.4f}"


def _constrained_pair(cfg, path, data, rows: int, repeats: int):
    """Seconds of (one prompt at a time, SDPA, full LM head) and (batched search, config attention,
    restricted head) on the first ``rows`` training rows, plus the agreement check."""
    from teacher.artifacts import split_prompts
    from teacher.constrained import rank_rows, rank_rows_batched
    from teacher.model import load_hf_model, load_tokenizer
    from teacher.trie import build_title_trie

    c = cfg.constrained
    if cfg.generate.threads:
        import torch

        torch.set_num_threads(cfg.generate.threads)
    old_model, new_model = load_hf_model(path, cfg.model.dtype), load_hf_model(path, cfg.model.dtype)
    old_model.set_attn_implementation("sdpa")
    new_model.set_attn_implementation(c.attention)
    tok = load_tokenizer(path)
    trie, seqs = build_title_trie(tok, data.titles)
    prompts, targets = split_prompts(data, "train", slice(0, rows)), data.splits["train"]["target"][:rows]
    outs = {}

    def old():
        outs["old"] = rank_rows(old_model, tok, trie, seqs, prompts, targets, c.k, c.beam_width, c.length_penalty)

    def new():
        outs["new"] = rank_rows_batched(new_model, tok, trie, seqs, prompts, targets, c.k, c.beam_width,
                                        c.length_penalty, c.batch_prompts)

    secs = alternate(old, new, repeats=repeats)
    (a, la, _, _), (b, lb, _, _) = outs["old"], outs["new"]
    same = int((a == b).all(1).sum())
    overlap = np.mean([len(set(x) & set(y)) / c.k for x, y in zip(a, b)])
    check = (f"same {c.k}-item list {same}/{len(a)} rows, set overlap {overlap:.3f}, same top-1 "
             f"{int((a[:, 0] == b[:, 0]).sum())}/{len(a)}, max log-prob difference {np.abs(la - lb).max():.2g}")
    del old_model, new_model
    gc.collect()
    return len(prompts), secs, check


def run_compare(cfg, ft, rows: int, ft_rows: int, repeats: int, out: str, only: list[str] | None = None,
                greedy_batch: int = 16, embed_batch: int = 512, embed_rows: int = 256, step_tokens: int = 0) -> str:
    """Run the pairs in ``only`` (default all of ``PAIRS``); markdown table to stdout and ``out``."""
    from dllm2rec.atomic import atomic_write_text
    from teacher.bench import _inputs
    from teacher.model import resolve_base_model

    only = only or list(PAIRS)
    unknown = sorted(set(only) - set(PAIRS))
    if unknown:
        raise ValueError(f"--only: unknown pair(s) {unknown} for --compare; choose from {PAIRS}")
    load0 = os.getloadavg()
    path = resolve_base_model(cfg.model.base)
    prompts, titles = _inputs(cfg, max(rows, (embed_rows + 1) // 2))[:2]  # main's _inputs also returns the data
    prompts, titles = prompts[:rows], titles[:embed_rows]
    res = []  # (what, unit, rows, old s, new s, check)
    if "finetune" in only:
        n, old, new, check = _finetune_pair(ft, ft_rows, repeats)
        res.append(("LoRA fine-tune (fp32 -> bf16 autocast)", "examples", n, old, new, check))
        print(res[-1], flush=True)
    if "logits" in only:
        n, secs, check, share, dt = _logits_pair(ft, ft_rows, repeats)
        what = "answer-only" if not ft.train_on_inputs else "prompt + answer"
        labels = list(secs)
        new = labels[-1]
        for old in labels[:-1]:
            res.append((f"LoRA fine-tune, {what} loss: {old} -> {new} ({share:.0%} of positions trained)",
                        "examples", n, secs[old], secs[new], check))
        print(res[-1], flush=True)
    if "greedy" in only:
        secs, cached, check = _greedy_pair(cfg, path, prompts, repeats, greedy_batch, step_tokens)
        b0, tok = cfg.generate.batch_size, step_tokens
        label = f"greedy generation ({cfg.model.dtype}; vLLM calls of {b0} -> {greedy_batch} rows"
        res.append((label + ")", "rows", len(prompts), secs[0], secs[1], check if not tok else "-"))
        if tok:
            res.append((label + f", engine step 4096 -> {tok} tokens)", "rows", len(prompts), secs[0], secs[2], check))
        res.append(("greedy, new path with every prompt already in the prefix cache (no prefill: a bound, not a path)",
                    "rows", len(prompts), secs[-1], cached, "prefill share of the new path = 1 - new/old"))
        print(res, flush=True)
    if "embed" in only:
        (f32, old, new), check = _embed_pair(cfg, path, titles, repeats, embed_batch)
        b0, dt = cfg.embed.batch_size, cfg.model.dtype
        res.append((f"title embedding (float32 -> {dt}; calls of {b0} -> {embed_batch} rows)", "rows",
                    len(titles), f32, new, check))
        res.append((f"title embedding ({dt}; calls of {b0} -> {embed_batch} rows)", "rows", len(titles),
                    old, new, "same engine"))
        print(res[-2:], flush=True)
    if "constrained" in only:
        c = cfg.constrained
        n, (old, new), check = _constrained_pair(cfg, path, _inputs(cfg, 1)[2], rows, repeats)
        res.append((f"constrained beam search ({cfg.model.dtype}, width {c.beam_width}, K {c.k}; one prompt, SDPA, "
                    f"full LM head -> {c.batch_prompts} prompts per search, {c.attention}, allowed tokens only)",
                    "rows", n, old, new, check))
        print(res[-1], flush=True)
    load1 = os.getloadavg()
    lines = [
        f"# Teacher old vs new paths ({platform.machine()}, {os.cpu_count()} CPUs, generate/embed threads "
        f"{cfg.generate.threads}/{cfg.embed.threads}, fine-tune threads {ft.threads or 'default'}, "
        f"alternating, median of {repeats})",
        "",
        f"Load average (1 min) before/after: {load0[0]:.1f} / {load1[0]:.1f} (shared machine).",
        "",
        "| path | rows | old s | new s | old per s | new per s | new / old | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for what, unit, n, old, new, check in res:
        lines.append(f"| {what} | {n} {unit} | {old:.2f} | {new:.2f} | {n / old:.2f} | {n / new:.2f} | "
                     f"**{old / new:.2f}x** | {check} |")
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(Path(out), table)
    return table
