"""``bench train`` / ``bench eval``: training-epoch and evaluation time at Amazon-Games size.

Input (synthetic, real schemas, cached under $DLLM2REC_CACHE or ~/.cache/dllm2rec/bench/):
14,980 training rows (and 14,980 valid / test rows), 17,408 items, a teacher folder with top_n 50
candidates per row and a 4096-wide float16 item-embedding table (random values: the cost depends
on shapes only). Run: SASRec + DRO (alpha 0.1) + official RD (K 10) + ED, batch 256, through the
REAL trainer (``dllm2rec.train.loop.train``); the epoch time is the trainer's own per-epoch
``train_seconds`` (training steps only); evaluation is ``evaluate_split`` on all 14,980 valid rows
(full ranking). Reports the median over ``--repeats`` epochs / evaluations, writes markdown (and JSON).

``--profile STEPS`` adds the per-step breakdown of ``dllm2rec.bench.step_profile`` (forward, ED,
DRO catalogue pass, RD, backward, optimizer). ``--compare REF`` measures the code of git revision
REF (exported with ``git archive`` into a temporary folder) and this working tree side by side:
one subprocess per measurement (1 epoch + 1 evaluation each), alternating old and new, so both see
the same background load; reports the medians and the old/new ratios (``dllm2rec.bench.compare``).
``--matmul-dtype`` sets ``train.matmul_dtype`` of the measured run (``dllm2rec.precision``);
``--fast-step`` sets ``train.fast_step`` (with ``--compare``: of this tree only, and of REF too with ``--old-fast-step``);
``--compare-precision`` measures float32 and bfloat16 of this tree the same way (alternating
subprocesses, at each of ``--compare-threads``) and how far bfloat16 evaluation ranks differ from
fp32 ranks of the same trained weights (``--rank-agreement``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=14980, help="training rows (also valid and test rows)")
    parser.add_argument("--items", type=int, default=17408, help="catalogue size N")
    parser.add_argument("--emb-dim", type=int, default=4096, help="teacher embedding width (ED)")
    parser.add_argument("--top-n", type=int, default=50, help="teacher candidates stored per row")
    parser.add_argument("--repeats", type=int, default=3, help="epochs / evaluations to take the median of")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--out", default="runs/bench/train_bench.md", help="markdown output (+ .json)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also time the parts of STEPS training steps (0 = off)")
    parser.add_argument("--compare", default=None, metavar="REF",
                        help="git revision to measure side by side with this tree (alternating subprocesses)")
    parser.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="train.matmul_dtype of the measured run (dtype of the heavy matrix products)")
    parser.add_argument("--fast-step", action="store_true",
                        help="train.fast_step=true for the measured run (with --compare: for this tree only, "
                             "REF may predate the key)")
    parser.add_argument("--old-fast-step", action="store_true",
                        help="with --compare and --fast-step: REF's runs get train.fast_step=true too (REF must "
                             "have the key), so two fast-step versions are measured side by side")
    parser.add_argument("--compare-precision", action="store_true",
                        help="measure matmul dtype float32 and bfloat16 side by side (alternating subprocesses)")
    parser.add_argument("--compare-threads", default=None, metavar="LIST",
                        help="with --compare-precision: comma-separated thread counts, e.g. 1,2 (default: --threads)")
    parser.add_argument("--rank-agreement", action="store_true",
                        help="with --matmul-dtype bfloat16: also rank the valid split in fp32 with the same trained "
                             "weights and report how the ranks and metrics differ")


def cache_dir() -> Path:
    return Path(os.environ.get("DLLM2REC_CACHE", Path.home() / ".cache" / "dllm2rec")) / "bench"


def games_inputs(rows: int, items: int, emb_dim: int, top_n: int) -> tuple[Path, Path]:
    """Synthetic dataset + teacher folders of the requested size (built once, then reused)."""
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher

    root = cache_dir() / f"games_r{rows}_n{items}"
    ds, teacher = root / "dataset", root / f"teacher_d{emb_dim}_k{top_n}"
    if not (ds / "manifest.json").is_file():
        synthetic_dataset(ds, n_items=items, n_train=rows, n_valid=rows, n_test=rows)
    if not (teacher / "manifest.json").is_file():
        synthetic_teacher(teacher, load_dataset(ds), top_n=top_n, emb_dim=emb_dim, emb_dtype="float16")
    return ds, teacher


def bench_config(ds: Path, teacher: Path, out: Path, epochs: int, matmul_dtype: str = "float32",
                 fast_step: bool = False):
    from dllm2rec.config import load_config

    return load_config(None, [
        f"data.path={ds}", "model.name=sasrec", "loss.objective=bce", "loss.dro_alpha=0.1",
        f"distill.teacher={teacher}", "distill.rd.enabled=true", "distill.rd.variant=official", "distill.rd.k=10",
        "distill.ed.enabled=true", "train.batch_size=256", f"train.epochs={epochs}", "train.patience=0",
        "train.progress=false", f"train.output_dir={out}", "train.checkpoint_every=1000",
        f"train.matmul_dtype={matmul_dtype}", f"train.fast_step={str(fast_step).lower()}",
    ])


def measure(args) -> dict:
    import torch

    from dllm2rec.train.distributed import make_accelerator
    from dllm2rec.eval.evaluate import evaluate_split
    from dllm2rec.precision import resolve
    from dllm2rec.train.loop import load_inputs, train

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    ds, teacher = games_inputs(args.rows, args.items, args.emb_dim, args.top_n)
    prep = time.time() - t0
    result = {"rows": args.rows, "items": args.items, "emb_dim": args.emb_dim, "top_n": args.top_n,
              "threads": torch.get_num_threads(), "prepare_seconds": round(prep, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(ds, teacher, Path(tmp) / "run", args.repeats, getattr(args, "matmul_dtype", "float32"),
                           getattr(args, "fast_step", False))
        result["matmul_dtype"] = cfg.train.matmul_dtype
        result["fast_step"] = cfg.train.fast_step
        if args.bench == "train":
            result["compile_seconds"] = train(cfg)["compile_seconds"]
            lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            epochs = [r["train_seconds"] for r in lines]
            result.update(epoch_seconds=epochs, epoch_median=statistics.median(epochs),
                          steps_per_epoch=-(-args.rows // 256))
        if getattr(args, "profile", 0):
            from dllm2rec.bench.step_profile import profile_steps

            result["profile"] = profile_steps(cfg, args.profile)
        accelerator = make_accelerator()
        inputs = load_inputs(cfg)
        student = inputs.student.eval()
        eval_kw = dict(chunk=cfg.loss.item_chunk, batch_size=cfg.train.eval_batch_size, llm_table=inputs.llm_table,
                       matmul_dtype=resolve(cfg.train.matmul_dtype), fused=cfg.train.fast_step)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            evaluate_split(student, inputs.splits["valid"], accelerator, cfg.eval.ks, **eval_kw)
            times.append(time.perf_counter() - t)
        result.update(eval_rows=len(inputs.splits["valid"]), eval_seconds=[round(x, 3) for x in times],
                      eval_median=statistics.median(times))
        if getattr(args, "rank_agreement", False) and eval_kw["matmul_dtype"] is not None:
            from dllm2rec.bench.compare import rank_agreement

            best = Path(tmp) / "run" / "best" / "model.safetensors"
            result["rank_agreement"] = rank_agreement(student, best, inputs.splits["valid"], accelerator, cfg, eval_kw)
    return result


def markdown(r: dict, argv: str) -> str:
    lines = [f"## bench {'train' if 'epoch_median' in r else 'eval'}", "",
             f"Command: `{argv}`  ", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch threads {r['threads']}, load average {os.getloadavg()[0]:.1f} at the end, "
             f"train.matmul_dtype {r.get('matmul_dtype', 'float32')}, train.fast_step "
             f"{str(r.get('fast_step', False)).lower()}", "",
             "| measurement | median (s) | runs (s) | target |", "|---|---|---|---|"]
    if "epoch_median" in r:
        lines.append(f"| one training epoch: {r['rows']:,} rows, {r['steps_per_epoch']} steps of 256, SASRec + DRO + "
                     f"official RD (K 10 of {r['top_n']}) + ED ({r['emb_dim']}-wide) | {r['epoch_median']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['epoch_seconds'])} | <= 2.2 |")
    lines.append(f"| full-ranking evaluation: {r['eval_rows']:,} rows x {r['items']:,} items | {r['eval_median']:.2f} | "
                 f"{', '.join(f'{x:.2f}' for x in r['eval_seconds'])} | <= 0.3 |")
    lines += ["", f"Synthetic input (built once, cached): {r['prepare_seconds']:.1f} s this run."]
    if r.get("compile_seconds"):
        lines.append(f"One-off compilation of the fused kernels (train.fast_step, before the first epoch): "
                     f"{r['compile_seconds']:.1f} s.")
    if "rank_agreement" in r:
        from dllm2rec.bench.compare import agreement_markdown

        lines += [""] + agreement_markdown(r["rank_agreement"], r["matmul_dtype"])
    if "profile" in r:
        from dllm2rec.bench.step_profile import profile_markdown

        lines += [""] + profile_markdown(r["profile"])
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import sys

    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    if args.compare or args.compare_precision:
        from dllm2rec.bench.compare import compare_precision, compare_revisions

        if args.compare and args.compare_precision:
            raise SystemExit("error: use --compare REF or --compare-precision, not both")
        text, r = compare_revisions(args) if args.compare else compare_precision(args)
        print(text)
        if args.out:
            atomic_write_text(args.out, text)
            atomic_write_json(Path(args.out).with_suffix(".json"), r)
        return 0
    r = measure(args)
    text = markdown(r, "python -m dllm2rec " + " ".join(sys.argv[1:]))
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
        atomic_write_json(Path(args.out).with_suffix(".json"), r)
    return 0
