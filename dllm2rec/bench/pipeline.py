"""``bench pipeline``: the whole pipeline at scale, wall time and peak RSS per stage.

``python -m dllm2rec bench pipeline --interactions 1M,5M --items 100k,1M`` runs, for every
(interactions, items) pair, one process per stage:

| stage | what runs |
|---|---|
| generate | ``dllm2rec.bench.pipeline_stages generate``: skewed synthetic log (Zipf items, long-tail users) |
| prepare | ``python -m dllm2rec data prepare --source recbole`` (the real protocol: windows + time split) |
| teacher | ``dllm2rec.bench.pipeline_stages teacher``: random LLM vectors, FAISS grounding (IVF above 50k items), teacher folder |
| train | ``python -m dllm2rec train``: SASRec, sampled softmax (``--num-sampled`` shared negatives), ED from the teacher table, 1 epoch (+ its valid/test evaluation) |
| evaluate | ``python -m dllm2rec evaluate --split test``: full ranking over all items |

Full-ranking evaluation is rows x items by definition; at 1M items and millions of rows it
outgrows the rest of the pipeline, so ``--eval-rows N`` ranks a fixed sample of N valid and N test
rows (``eval.valid_rows`` / ``eval.test_rows``; still over every item) and the table says so.

Each stage is measured from outside: wall time, and peak RSS = the stage process's high-water
mark (VmHWM from /proc, polled). A stage is killed when it passes ``--stage-timeout`` seconds or
``--max-rss-gb`` (polled from /proc), and later stages of that size are skipped: the table says so
and nothing is extrapolated. All stages run with ``OMP_NUM_THREADS=--threads`` (default 1: the
machine is shared). Folders go under ``--work`` (deleted per size unless ``--keep`` or a stage failed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("generate", "prepare", "teacher", "train", "evaluate")


def parse_count(text: str) -> int:
    """'1M' -> 1_000_000, '100k' -> 100_000, '2500' -> 2500."""
    t = text.strip().lower()
    mult = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 5M, 100k, 2500)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def parse_counts(text: str) -> list[int]:
    return [parse_count(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interactions", type=parse_counts, default=[10 ** 6], help="comma list, e.g. 1M,5M,20M")
    parser.add_argument("--items", type=parse_counts, default=[10 ** 5], help="comma list, e.g. 100k,1M")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list out of {','.join(STAGES)}")
    parser.add_argument("--emb-dim", type=int, default=64, help="random LLM vector width (ED input)")
    parser.add_argument("--top-n", type=int, default=20, help="teacher candidates per row")
    parser.add_argument("--num-sampled", type=int, default=1024, help="sampled-softmax negatives per batch")
    parser.add_argument("--optimizer", type=_optimizers, default=["adam"],
                        help="train.optimizer of the train/evaluate stages; a comma list (adam,lazy_adam) runs "
                             "them once per optimizer, side by side on the same data")
    parser.add_argument("--eval-rows", type=parse_count, default=0,
                        help="rank a fixed sample of this many valid and test rows (eval.valid_rows / "
                             "eval.test_rows) instead of every row; 0 = every row")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per stage")
    parser.add_argument("--stage-timeout", type=float, default=600, help="seconds before a stage is killed")
    parser.add_argument("--max-rss-gb", type=float, default=16.0, help="RSS at which a stage is killed")
    parser.add_argument("--work", default="runs/bench/pipeline", help="working folder")
    parser.add_argument("--keep", action="store_true", help="keep the per-size folders")
    parser.add_argument("--out", default="runs/bench/pipeline_bench.md", help="markdown output (+ .json)")


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in bytes, (0, 0) when it is gone."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def run_stage(cmd: list[str], log: Path, env: dict, timeout: float, max_rss: float) -> dict:
    """Run one stage process; returns seconds, peak_rss_gb and status ("ok", "exit N", "timeout", "rss limit").

    Peak RSS is the process's own high-water mark (VmHWM, polled every 0.1 s; it never decreases,
    so only growth in the last 0.1 s before exit can be missed). ``wait4``'s ru_maxrss is not used:
    on Linux it also counts the forked copy of this (parent) process before ``exec``."""
    t0 = time.perf_counter()
    peak = 0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        status = None
        while True:
            pid, code, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, hwm = _memory(proc.pid)
            peak = max(peak, hwm)
            reason = ("timeout" if time.perf_counter() - t0 > timeout else "rss limit" if rss > max_rss else None)
            if reason and status is None:
                status = reason
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own session: nothing else is touched
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(code)
    seconds = time.perf_counter() - t0
    if status is None:
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(peak / 2 ** 30, 3), "status": status}


def _optimizers(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ("adam", "lazy_adam")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {bad or text!r}; choose adam, lazy_adam")
    return names


def run_name(optimizer: str) -> str:
    """The train stage's run folder: ``run`` for Adam (as before), ``run_<optimizer>`` otherwise."""
    return "run" if optimizer == "adam" else f"run_{optimizer}"


def _suffixed(stem: str, optimizer: str, ext: str) -> str:
    return f"{stem}{ext}" if optimizer == "adam" else f"{stem}_{optimizer}{ext}"


def train_config(folder: Path, dataset: Path, teacher: Path, args, optimizer: str = "adam") -> Path:
    """The resolved student config for the train stage (written as YAML, read by ``train --config``)."""
    import yaml

    from dllm2rec.config import config_to_dict, load_config

    cfg = load_config(None, [
        f"data.path={dataset}", "model.name=sasrec", "loss.objective=sampled_softmax",
        f"loss.num_sampled={args.num_sampled}", f"distill.teacher={teacher}", "distill.ed.enabled=true",
        "distill.rd.enabled=false", "train.epochs=1", "train.patience=0", "train.progress=false",
        f"train.output_dir={folder / run_name(optimizer)}", f"train.optimizer={optimizer}",
        f"eval.valid_rows={getattr(args, 'eval_rows', 0)}", f"eval.test_rows={getattr(args, 'eval_rows', 0)}",
    ])
    path = folder / _suffixed("train", optimizer, ".yaml")
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def stage_commands(folder: Path, n_inter: int, n_items: int, args, optimizer: str = "adam") -> dict[str, list[str]]:
    py = [sys.executable, "-m"]
    log, ds, teacher = folder / "log", folder / "dataset", folder / "teacher"
    return {
        "generate": py + ["dllm2rec.bench.pipeline_stages", "generate", "--out", str(log),
                          "--interactions", str(n_inter), "--items", str(n_items)],
        "prepare": py + ["dllm2rec", "data", "prepare", "--source", "recbole", "--input", str(log), "--out", str(ds)],
        "teacher": py + ["dllm2rec.bench.pipeline_stages", "teacher", "--dataset", str(ds), "--out", str(teacher),
                         "--dim", str(args.emb_dim), "--top-n", str(args.top_n)],
        "train": py + ["dllm2rec", "train", "--config", str(folder / _suffixed("train", optimizer, ".yaml"))],
        "evaluate": py + ["dllm2rec", "evaluate", "--run", str(folder / run_name(optimizer)), "--split", "test",
                          "--out", str(folder / _suffixed("test_metrics", optimizer, ".json"))],
    }


def measure_size(n_inter: int, n_items: int, args, stages: list[str]) -> list[dict]:
    folder = Path(args.work) / f"i{n_inter}_n{n_items}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    optimizers = getattr(args, "optimizer", ["adam"])
    rows, failed = [], None
    # train/evaluate run once per optimizer (all trains first, then all evaluations), on the same files
    plan = [(name, opt) for name in stages for opt in (optimizers if name in ("train", "evaluate") else ["adam"])]
    for name, opt in plan:
        label = name if (name not in ("train", "evaluate") or optimizers == ["adam"]) else f"{name} [{opt}]"
        row = {"interactions": n_inter, "items": n_items, "stage": label}
        if failed:
            rows.append({**row, "status": f"skipped ({failed} did not finish)"})
            continue
        if name == "train":
            train_config(folder, folder / "dataset", folder / "teacher", args, opt)
        cmd = stage_commands(folder, n_inter, n_items, args, opt)[name]
        log = folder / (f"{name}.log" if label == name else f"{name}_{opt}.log")
        row.update(run_stage(cmd, log, env, args.stage_timeout, args.max_rss_gb * 2 ** 30))
        row.update(_details(folder, name, opt))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["status"] != "ok":
            failed = label
    if not args.keep and not failed:  # a failed size keeps its folder (stage logs) for inspection
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _details(folder: Path, name: str, optimizer: str = "adam") -> dict:
    """Numbers the stage wrote itself (rows, epoch / evaluation seconds, valid NDCG@20)."""
    try:
        if name == "prepare":
            m = json.loads((folder / "dataset" / "manifest.json").read_text())
            return {"rows": m["counts"], "users": m.get("stats", {}).get("users"), "n_items": m["n_items"]}
        if name == "train":
            rec = json.loads((folder / run_name(optimizer) / "metrics.jsonl").read_text().splitlines()[-1])
            return {"epoch_seconds": rec["train_seconds"], "epoch_eval_seconds": rec["eval_seconds"],
                    "valid_ndcg20": (rec.get("valid") or {}).get("ndcg@20")}
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return {}


def markdown(rows: list[dict], argv: str, eval_rows: int = 0) -> str:
    scope = f"a fixed sample of {eval_rows:,} rows per split" if eval_rows else "every row"
    lines = ["## bench pipeline", "", f"Command: `{argv}`  ", f"Evaluation (valid, test): {scope}, full ranking over all items  ",
             f"Load average at the end: {os.getloadavg()[0]:.1f}", "",
             "| interactions | items | stage | seconds | peak RSS GB | status | notes | time growth vs previous size |",
             "|---|---|---|---|---|---|---|---|"]
    prev: dict[tuple[int, str], dict] = {}
    for r in rows:
        notes = ""
        if "rows" in r:
            notes = (f"rows {r['rows']['train']:,}/{r['rows']['valid']:,}/{r['rows']['test']:,}, users {r.get('users') or 0:,}, "
                     f"items in the log {r['n_items']:,}")
        if "epoch_seconds" in r:
            notes = f"epoch {r['epoch_seconds']:.1f} s + valid/test evaluation {r['epoch_eval_seconds']:.1f} s"
            if r.get("valid_ndcg20") is not None:
                notes += f", valid NDCG@20 {r['valid_ndcg20']:.4f}"
        growth = ""
        before = prev.get((r["items"], r["stage"]))
        if before and r.get("status") == "ok" and before.get("status") == "ok" and before["seconds"] > 0:
            growth = (f"{r['seconds'] / before['seconds']:.2f}x for {r['interactions'] / before['interactions']:.1f}x "
                      "interactions")
        lines.append(f"| {r['interactions']:,} | {r['items']:,} | {r['stage']} | {r.get('seconds', '')} | "
                     f"{r.get('peak_rss_gb', '')} | {r['status']} | {notes} | {growth} |")
        if r.get("status") == "ok":
            prev[(r["items"], r["stage"])] = r
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"error: unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    rows = []
    for n_items in args.items:
        for n_inter in args.interactions:
            rows += measure_size(n_inter, n_items, args, stages)
    text = markdown(rows, "python -m dllm2rec " + " ".join(sys.argv[1:]), args.eval_rows)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
        atomic_write_json(Path(args.out).with_suffix(".json"), rows)
    return 0
