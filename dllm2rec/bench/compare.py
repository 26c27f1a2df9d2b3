"""``bench train --compare REF``: the training epoch and evaluation of git revision REF and of this
working tree, measured side by side on a shared, noisy machine.

REF is exported with ``git archive`` into a temporary folder (the exact committed code, nothing of
this tree). Each measurement is one subprocess ``python -m dllm2rec bench train --repeats 1`` run
from the tree under test (so it imports that tree's package): one epoch through the real trainer and
one full evaluation. Old and new alternate (old-new, new-old, ...) so that both see the same
background load; the result is the median of each and the ratio old / new of the medians, with
the load average before every measurement.

``bench train --compare-precision``: the same alternation between ``train.matmul_dtype=float32`` and
``bfloat16`` of this tree, at each thread count of ``--compare-threads``; the first bfloat16 run
of each thread count also reports ``rank_agreement`` (bfloat16 vs fp32 evaluation ranks).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def repo_root() -> Path:
    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: --compare needs a git checkout ({here}: {out.stderr.strip()})")
    return Path(out.stdout.strip())


def export_revision(root: Path, ref: str, dest: Path) -> str:
    """Extract ``ref`` of the repository at ``root`` into ``dest``; returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode:
        raise SystemExit(f"error: --compare {ref!r}: not a commit of {root} ({commit.stderr.strip()})")
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(root), "archive", commit.stdout.strip()], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise SystemExit(f"error: git archive {ref} failed")
    return commit.stdout.strip()


def measure_tree(tree: Path, args, out: Path, extra: tuple[str, ...] = (), threads: int | None = None) -> dict:
    """One ``bench train --repeats 1 [extra...]`` in a subprocess importing the package of ``tree``."""
    threads = args.threads if threads is None else threads
    cmd = [sys.executable, "-m", "dllm2rec", "bench", "train", "--rows", str(args.rows), "--items", str(args.items),
           "--emb-dim", str(args.emb_dim), "--top-n", str(args.top_n), "--repeats", "1",
           "--threads", str(threads), "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(tree))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.with_suffix(".json").read_text())


def _dtype_args(args) -> tuple[str, ...]:
    """``--matmul-dtype`` passed on to both trees (float32, the default, passes nothing: old trees may predate it)."""
    dtype = getattr(args, "matmul_dtype", "float32")
    return () if dtype == "float32" else ("--matmul-dtype", dtype)


def _fast_note(args) -> str:
    if not getattr(args, "fast_step", False):
        return ""
    return ", both with train.fast_step=true" if getattr(args, "old_fast_step", False) else ", new with train.fast_step=true"


def compare_revisions(args) -> tuple[str, dict]:
    root = repo_root()
    runs: dict[str, dict[str, list[float]]] = {"old": {"epoch": [], "eval": []}, "new": {"epoch": [], "eval": []}}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_revision(root, args.compare, Path(tmp) / "old")
        trees = {"old": Path(tmp) / "old", "new": root}
        for i in range(args.repeats):
            for tag in (("old", "new") if i % 2 == 0 else ("new", "old")):
                loads.append(round(os.getloadavg()[0], 2))
                fast = ("--fast-step",) if getattr(args, "fast_step", False) and (
                    tag == "new" or getattr(args, "old_fast_step", False)) else ()
                r = measure_tree(trees[tag], args, Path(tmp) / f"{tag}{i}.md", _dtype_args(args) + fast)
                runs[tag]["epoch"].append(r["epoch_median"])
                runs[tag]["eval"].append(r["eval_median"])
    med = {tag: {k: statistics.median(v) for k, v in d.items()} for tag, d in runs.items()}
    result = {"ref": args.compare, "commit": commit, "threads": args.threads, "runs": runs, "medians": med,
              "ratio_old_over_new": {k: med["old"][k] / med["new"][k] for k in ("epoch", "eval")},
              "load_averages": loads}
    lines = [f"## bench train --compare {args.compare}", "",
             f"Command: `python -m dllm2rec {' '.join(sys.argv[1:])}`  ",
             f"old = {args.compare} ({commit[:12]}), new = this working tree; {args.repeats} alternating pairs, "
             f"threads {args.threads or 'default'}, train.matmul_dtype {getattr(args, 'matmul_dtype', 'float32')}"
             f"{_fast_note(args)}; "
             f"1-minute load average before each run: "
             f"{', '.join(str(x) for x in loads)}", "",
             "| measurement | old median (s) | new median (s) | old / new | old runs (s) | new runs (s) |",
             "|---|---|---|---|---|---|"]
    for k, name in (("epoch", "training epoch"), ("eval", "full evaluation")):
        lines.append(f"| {name} | {med['old'][k]:.2f} | {med['new'][k]:.2f} | {result['ratio_old_over_new'][k]:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in runs['old'][k])} | {', '.join(f'{x:.2f}' for x in runs['new'][k])} |")
    return "\n".join(lines) + "\n", result


def _thread_counts(args) -> list[int]:
    if not args.compare_threads:
        return [args.threads]
    try:
        counts = [int(x) for x in args.compare_threads.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 0 for c in counts):
        raise SystemExit(f"error: --compare-threads {args.compare_threads!r}: expected thread counts like 1,2")
    return counts


def compare_precision(args) -> tuple[str, dict]:
    """float32 vs bfloat16 (``train.matmul_dtype``) of this tree, alternating subprocesses per thread count."""
    root = repo_root()
    modes = ("float32", "bfloat16")
    result = {"threads": {}, "repeats": args.repeats}
    lines = ["## bench train --compare-precision", "", f"Command: `python -m dllm2rec {' '.join(sys.argv[1:])}`  ",
             f"this working tree, train.matmul_dtype float32 vs bfloat16; {args.repeats} alternating pairs per "
             "thread count (one subprocess per measurement: 1 epoch + 1 evaluation)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for threads in _thread_counts(args):
            runs = {m: {"epoch": [], "eval": []} for m in modes}
            loads, agreement = [], None
            for i in range(args.repeats):
                for mode in (modes if i % 2 == 0 else modes[::-1]):
                    loads.append(round(os.getloadavg()[0], 2))
                    extra = ("--matmul-dtype", mode) + (("--rank-agreement",) if mode != "float32" and agreement is None
                                                        else ())
                    r = measure_tree(root, args, Path(tmp) / f"{mode}_t{threads}_{i}.md", extra, threads)
                    runs[mode]["epoch"].append(r["epoch_median"])
                    runs[mode]["eval"].append(r["eval_median"])
                    agreement = r.get("rank_agreement", agreement)
            med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in runs.items()}
            ratio = {k: med["float32"][k] / med["bfloat16"][k] for k in ("epoch", "eval")}
            result["threads"][str(threads)] = {"runs": runs, "medians": med, "ratio_fp32_over_bf16": ratio,
                                               "load_averages": loads, "rank_agreement": agreement}
            lines += [f"### {threads or 'default'} thread(s)", "",
                      f"1-minute load average before each run: {', '.join(str(x) for x in loads)}", "",
                      "| measurement | float32 median (s) | bfloat16 median (s) | float32 / bfloat16 | float32 runs (s) | "
                      "bfloat16 runs (s) |", "|---|---|---|---|---|---|"]
            for k, name in (("epoch", "training epoch"), ("eval", "full evaluation")):
                lines.append(f"| {name} | {med['float32'][k]:.2f} | {med['bfloat16'][k]:.2f} | {ratio[k]:.2f}x | "
                             f"{', '.join(f'{x:.2f}' for x in runs['float32'][k])} | "
                             f"{', '.join(f'{x:.2f}' for x in runs['bfloat16'][k])} |")
            if agreement:
                lines += [""] + agreement_markdown(agreement, "bfloat16")
            lines.append("")
    return "\n".join(lines), result


def rank_agreement(student, weights: Path, data, accelerator, cfg, eval_kw: dict) -> dict:
    """Evaluation ranks with ``eval_kw["matmul_dtype"]`` vs fp32 ranks of the same weights (the run's
    ``best/model.safetensors`` when it exists, else the freshly initialised student) -> summary dict."""
    import torch

    from dllm2rec.eval.evaluate import split_ranks
    from dllm2rec.eval.metrics import hr_ndcg
    from dllm2rec.readers import read_safetensors

    trained = weights.is_file()
    if trained:
        student.load_state_dict(read_safetensors(weights))
    reduced = split_ranks(student, data, accelerator, **eval_kw).long()
    exact = split_ranks(student, data, accelerator, **{**eval_kw, "matmul_dtype": None, "fused": False}).long()
    diff = (reduced - exact).abs()
    ks = [10, 20]
    return {"weights": "trained (bench epochs)" if trained else "untrained (fresh initialisation)",
            "rows": int(exact.numel()), "equal_share": float((diff == 0).double().mean()),
            "mean_abs_diff": float(diff.double().mean()), "max_abs_diff": int(diff.max()) if diff.numel() else 0,
            "better_share": float((reduced < exact).double().mean()), "worse_share": float((reduced > exact).double().mean()),
            "fp32": hr_ndcg(exact, ks), "reduced": hr_ndcg(reduced, ks),
            "top20_changed": int(((exact <= 20) != (reduced <= 20)).sum())}


def agreement_markdown(a: dict, dtype: str) -> list[str]:
    lines = [f"Rank agreement, {dtype} vs float32 evaluation of the same {a['weights']} weights, {a['rows']:,} valid "
             f"rows: equal rank {a['equal_share']:.2%}, {dtype} better {a['better_share']:.2%} / worse "
             f"{a['worse_share']:.2%}, mean |rank difference| {a['mean_abs_diff']:.2f} (max {a['max_abs_diff']}), "
             f"rows entering or leaving the top 20: {a['top20_changed']}", "",
             "| metric | float32 | " + dtype + " |", "|---|---|---|"]
    for k in a["fp32"]:
        lines.append(f"| {k} | {a['fp32'][k]:.5f} | {a['reduced'][k]:.5f} |")
    return lines
