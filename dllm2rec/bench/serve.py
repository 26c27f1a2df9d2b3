"""``bench serve``: student serving throughput and latency vs the LLM teacher's per-row cost.

Student side: a SASRec student (real architecture, RANDOM weights: speed does not depend on the
values) encodes random histories (lengths 1..max_len) and ranks the full catalogue, for catalogue
sizes 1.7k (MovieLens-100K), 17k (Amazon Games) and 1M items, batch sizes 1 / 32 / 1024, with the
dense chunked matmul and exact FAISS IndexFlatIP (optionally IVF, with its measured recall@k).
One request = one batch; each cell repeats requests until ``--seconds`` per cell (at least
``--min-requests``) and reports rows/s, p50 and p99 request latency (p99 of few requests is
close to the max: the request count is in the table).

Teacher side (``--teacher auto|measure|skip``): if the teacher engineer's bench output exists
(``--teacher-bench``, default runs/bench/teacher_bench.md) its text is appended; ``measure``
(or ``auto`` when no such file exists) times the BIGRec path per row with transformers on the
same machine: SmolLM2-135M greedy generation of a BIGRec prompt (real Games titles when the shared
reference data is present), last-token embedding of the generated text, and FAISS L2 grounding
over an item table of the teacher's width (17,408 x 576, random values; grounding cost depends
on the shape only).

Writes the markdown to stdout and ``--out`` (atomically) plus ``--out`` with ``.json``.
Called as ``python -m dllm2rec bench serve`` (via dllm2rec/bench/cli.py) or
``python -m dllm2rec.bench.serve``.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

CATALOGUES = {"1.7k": 1_682, "17k": 17_408, "1M": 1_000_000}
BATCHES = (1, 32, 1024)
GAMES = Path(__file__).resolve().parents[3] / "shared" / "data" / "dllm2rec-games"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalogues", default="1.7k,17k,1M", help=f"comma list of {', '.join(CATALOGUES)} or integers")
    parser.add_argument("--batches", default="1,32,1024")
    parser.add_argument("--methods", default="dense,flat,ivf", help="dense, flat, ivf (ivf also reports recall@k)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.5, help="time budget per cell")
    parser.add_argument("--min-requests", type=int, default=3)
    parser.add_argument("--max-cell-s", type=float, default=20.0, help="stop a cell after this long (>= 1 request)")
    parser.add_argument("--max-request-cpu-s", type=float, default=15.0,
                        help="skip a cell whose request would need more CPU seconds (estimated from the smaller batch)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/FAISS/BLAS threads (0 = library default); 1 is steadier on a shared machine")
    parser.add_argument("--teacher", default="auto", choices=["auto", "measure", "skip"])
    parser.add_argument("--teacher-bench", default="runs/bench/teacher_bench.md")
    parser.add_argument("--teacher-rows", type=int, default=16)
    parser.add_argument("--out", default="runs/bench/serve.md")


def _catalogue(text: str) -> tuple[str, int]:
    return (text, CATALOGUES[text]) if text in CATALOGUES else (text, int(text))


def _student(n_items: int, hidden: int, max_len: int):
    from dllm2rec.config import ModelConfig
    from dllm2rec.models import build_student

    torch.manual_seed(0)
    model = build_student(ModelConfig(name="sasrec", hidden=hidden, max_len=max_len), n_items)
    return model.eval()


def _requests(n_items: int, batch: int, max_len: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
        hist = torch.randint(0, n_items, (batch, max_len), generator=g)
        hist = hist.masked_fill(torch.arange(max_len)[None, :] >= lengths[:, None], n_items)
        yield hist, lengths


@torch.no_grad()
def time_cell(model, retriever, n_items: int, batch: int, k: int, max_len: int, seconds: float,
              min_requests: int, max_cell_s: float) -> dict:
    """Serve requests of ``batch`` rows (encode + top-k with history excluded) for ``seconds``
    (at least ``min_requests``, unless one request alone passes ``max_cell_s``)."""
    lat, cpu = [], []
    warm = next(_requests(n_items, min(batch, 32), max_len, 1, seed=99))
    retriever.search(model.encode(*warm), k, warm[0])  # warm-up (allocations, thread pools)
    start = time.perf_counter()
    for hist, lengths in _requests(n_items, batch, max_len, 10_000):
        t0, c0 = time.perf_counter(), time.process_time()
        retriever.search(model.encode(hist, lengths), k, hist)
        lat.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        elapsed = time.perf_counter() - start
        if (len(lat) >= min_requests and elapsed >= seconds) or elapsed >= max_cell_s:
            break
    lat_ms = np.array(lat) * 1e3
    return {"requests": len(lat), "rows_per_s": batch * len(lat) / (lat_ms.sum() / 1e3),
            "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
            # CPU time of all threads per row: robust to other jobs on a shared machine.
            "cpu_ms_per_row": float(np.sum(cpu) * 1e3 / (batch * len(lat)))}


def bench_students(args) -> list[dict]:
    from dllm2rec.serve.retrieval import build_retriever, measure_recall

    rows = []
    for name, n in (_catalogue(c) for c in args.catalogues.split(",")):
        model = _student(n, args.hidden, args.max_len)
        w, b = model.output.weight.detach(), model.output.bias.detach()
        exact_ids = None
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            # IVF: ~4 sqrt(N) lists, capped so that k-means training stays a few seconds at 1M.
            kw = {"nlist": min(1024, int(4 * n ** 0.5)), "nprobe": 32} if method == "ivf" else {}
            retriever = build_retriever(w, b, method=method, **kw)
            build_s = time.perf_counter() - t0
            recall = None
            if method in ("ivf", "hnsw"):
                q_hist, q_len = next(_requests(n, 256, args.max_len, 1, seed=7))
                with torch.no_grad():
                    q = model.encode(q_hist, q_len)
                if exact_ids is None:
                    exact_ids = build_retriever(w, b, method="dense").search(q, args.top_k, q_hist)[1]
                recall = measure_recall(retriever.search(q, args.top_k, q_hist)[1], exact_ids)
            # CPU seconds per row of the previous (smaller) batch of this method: unlike wall time
            # it does not depend on other jobs sharing the machine.
            per_row_s = None
            for batch in (int(x) for x in args.batches.split(",")):
                base = {"catalogue": name, "n_items": n, "method": method, "batch": batch, "build_s": build_s,
                        "recall": recall}
                if per_row_s is not None and per_row_s * batch > args.max_request_cpu_s:
                    # Not run: say so with the estimate, never invent a measurement.
                    rows.append({**base, "skipped": f"estimated {per_row_s * batch:.0f} CPU s/request from the "
                                                    f"smaller batch > --max-request-cpu-s {args.max_request_cpu_s:g}"})
                    print(f"  {name:>5} {method:<5} batch {batch:>4}: skipped ({rows[-1]['skipped']})", flush=True)
                    continue
                cell = time_cell(model, retriever, n, batch, args.top_k, args.max_len, args.seconds,
                                 args.min_requests, args.max_cell_s)
                per_row_s = cell["cpu_ms_per_row"] / 1e3
                rows.append({**base, **cell})
                print(f"  {name:>5} {method:<5} batch {batch:>4}: {cell['rows_per_s']:>10.0f} rows/s  "
                      f"p50 {cell['p50_ms']:.2f} ms  p99 {cell['p99_ms']:.2f} ms  cpu/row {cell['cpu_ms_per_row']:.3f} ms "
                      f"({cell['requests']} requests)",
                      flush=True)
        del model
    return rows


def _games_titles() -> list[str] | None:
    f = GAMES / "id2name.txt"
    if not f.is_file():
        return None
    return [line.rsplit("\t", 1)[0].strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def measure_teacher(n_rows: int) -> dict:
    """Per-row seconds of BIGRec inference (generate + embed + ground) with transformers."""
    from teacher.embed import hf_embed
    from teacher.generate import hf_generate
    from teacher.ground import build_index, search
    from teacher.model import fetch_smollm2, load_hf_model, load_tokenizer
    from teacher.prompts import build_prompt

    t0 = time.perf_counter()
    folder = fetch_smollm2()
    model, tok = load_hf_model(folder, "float32"), load_tokenizer(folder)
    load_s = time.perf_counter() - t0
    titles = _games_titles()
    real = titles is not None
    titles = titles or [f"Item {i}" for i in range(17_408)]
    rng = np.random.default_rng(0)
    domain = {"item": "video game", "items": "video games", "verb": "played"}
    prompts = [build_prompt([titles[i] for i in rng.choice(len(titles), 10, replace=False)], domain)
               for _ in range(n_rows)]
    t0, c0 = time.perf_counter(), time.process_time()
    texts = hf_generate(model, tok, prompts, "greedy", max_new_tokens=32, batch_size=16, progress=False)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = hf_embed(model, tok, texts, batch_size=16, progress=False)
    emb_s = time.perf_counter() - t0
    items = rng.standard_normal((17_408, q.shape[1])).astype(np.float32)
    index = build_index(items, "flat")
    t0 = time.perf_counter()
    search(q, items, 20, built=index)
    ground_s = time.perf_counter() - t0
    total = gen_s + emb_s + ground_s
    cpu_s = time.process_time() - c0  # all threads, generate + embed + index build + ground
    return {"cpu_ms_per_row": cpu_s * 1e3 / n_rows, "rows": n_rows, "load_s": load_s, "generate_s": gen_s, "embed_s": emb_s, "ground_s": ground_s,
            "per_row_s": total / n_rows, "rows_per_s": n_rows / total, "real_titles": real,
            "engine": "transformers fp32, greedy, 32 new tokens, batch 16", "model": "SmolLM2-135M-Instruct"}


def teacher_section(args) -> tuple[list[str], dict | None]:
    lines = ["", "### Teacher (LLM) per-row cost, same machine", ""]
    bench_file = Path(args.teacher_bench)
    measured = None
    if args.teacher == "skip":
        return lines + ["Not measured (--teacher skip)."], None
    if args.teacher == "auto" and bench_file.is_file():
        return lines + [f"From the teacher bench ({bench_file}):", "", bench_file.read_text(encoding="utf-8").strip()], None
    try:
        measured = measure_teacher(args.teacher_rows)
    except ImportError as exc:
        return lines + [f"Not measured: the teacher stack is missing ({exc})."], None
    m = measured
    lines += [
        f"{m['model']}, {m['engine']}, {m['rows']} BIGRec prompts ({'real Games titles' if m['real_titles'] else 'synthetic titles'}), "
        f"grounding = FAISS IndexFlatL2 over 17,408 x 576 (random values), model load {m['load_s']:.1f} s (not counted).",
        "",
        "| stage | seconds for all rows | ms / row |", "|---|---|---|",
        *(f"| {s} | {m[s + '_s']:.2f} | {m[s + '_s'] / m['rows'] * 1e3:.1f} |" for s in ("generate", "embed", "ground")),
        f"| **total** | {m['per_row_s'] * m['rows']:.2f} | **{m['per_row_s'] * 1e3:.1f}** ({m['rows_per_s']:.2f} rows/s) |",
        "", f"Teacher CPU time (all threads): {m['cpu_ms_per_row']:.1f} ms per row.",
    ]
    return lines, measured


def markdown(rows: list[dict], args, threads: int, load: tuple) -> list[str]:
    cpu = platform.processor() or platform.machine()
    lines = [
        "### Student serving (CPU)", "",
        f"SASRec student, hidden {args.hidden}, max_len {args.max_len}, RANDOM weights (speed does not depend on "
        f"the values); one request = one batch of random histories, encode + full-catalogue top-{args.top_k} "
        f"with history excluded; {threads} torch/FAISS threads, {cpu} ({os.cpu_count()} cores), torch {torch.__version__}; "
        f"load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end (a shared machine: wall-clock "
        "numbers include waiting for other jobs, CPU ms/row does not). rows/s over all requests of a cell; "
        "latency per request.", "",
        "| items | method | batch | rows/s | p50 ms | p99 ms | CPU ms/row | requests | index build s | recall@k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n_items']:,} | {r['method']} | {r['batch']} | not run: {r['skipped']} | | | | | | |")
            continue
        rec = "exact" if r["recall"] is None else f"{r['recall']:.3f}"
        lines.append(f"| {r['n_items']:,} | {r['method']} | {r['batch']} | {r['rows_per_s']:,.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['cpu_ms_per_row']:.3f} | {r['requests']} | {r['build_s']:.2f} | {rec} |")
    return lines


def run(args: argparse.Namespace) -> int:
    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    if args.threads:
        # FAISS's bundled BLAS reads this at load time: set it before faiss is imported.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    t0, load = time.perf_counter(), os.getloadavg()
    rows = bench_students(args)
    lines = markdown(rows, args, threads, load)
    teacher_lines, teacher = teacher_section(args)
    lines += teacher_lines
    same = [r for r in rows if r["n_items"] == 17_408 and r["method"] in ("dense", "flat") and "rows_per_s" in r]
    if teacher is not None and same:
        # Like for like: the teacher grounds over the 17,408 Games items; exact student top-k there.
        best = max(same, key=lambda r: r["rows_per_s"])
        lines += ["", f"Student vs teacher at 17,408 items (exact top-k, best batch: {best['method']} batch "
                      f"{best['batch']}): {best['rows_per_s']:,.0f} vs {teacher['rows_per_s']:.2f} rows/s wall "
                      f"({best['rows_per_s'] / teacher['rows_per_s']:,.0f}x); CPU per row {best['cpu_ms_per_row']:.3f} "
                      f"vs {teacher['cpu_ms_per_row']:.1f} ms ({teacher['cpu_ms_per_row'] / best['cpu_ms_per_row']:,.0f}x)."]
    lines += ["", f"Bench wall time {time.perf_counter() - t0:.0f} s. Command: `python -m dllm2rec bench serve "
                  f"--catalogues {args.catalogues} --batches {args.batches} --methods {args.methods} --threads {args.threads}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    atomic_write_text(out, text)
    atomic_write_json(out.with_suffix(".json"), {"students": rows, "teacher": teacher, "threads": threads,
                                                 "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m dllm2rec.bench.serve", description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
