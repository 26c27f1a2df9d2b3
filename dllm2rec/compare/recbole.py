"""``python -m dllm2rec recbole``: train RecBole 1.2.1's SASRec / GRU4Rec on OUR split and compare.

    python -m dllm2rec recbole --dataset runs/data/ml-100k --models SASRec GRU4Rec \
        --seeds 0 1 2 --out runs/recbole [--epochs 50] [--threads 1] \
        [--teacher-top-n 50] [--teacher-out runs/teacher/recbole-gru4rec]

Steps:
1. ``recbole_export.export_recbole`` writes the prepared split as RecBole benchmark files to
   ``<out>/atomic/dllm2rec-<name>/`` (the prefix keeps RecBole from substituting its bundled
   ``ml-100k`` example, which it does for that exact dataset name).
2. For every (model, seed) ``recbole_runner.py`` runs in the OPTIONAL RecBole venv
   (``bash launch/recbole_env.sh``; override with ``--recbole-python`` or ``$RECBOLE_PYTHON``)
   with ``launch/recbole/base.yaml`` + ``launch/recbole/<model>.yaml``, cwd = the run folder
   (RecBole writes ``log/`` and ``log_tensorboard/`` into its cwd).
3. The test metrics RecBole reports at the best-VALID-NDCG@20 epoch are cross-checked against
   HR@K / NDCG@K recomputed by ``dllm2rec.eval.metrics.hr_ndcg`` from the per-row target ranks the
   runner saved (full ranking over all N items, one target, NDCG = 1/log2(rank+1), rank = 1 +
   #items scored strictly higher, as in ``dllm2rec.eval.metrics``); the run's
   ``result.json`` records both and whether they agree.
4. ``<out>/results.json`` and ``<out>/results.md``: mean +- std over seeds per model.
5. With ``--teacher-top-n N`` every run folder also gets the best-valid model as a teacher
   (``teacher_rankings.jsonl`` + ``item_embeddings.npy``, see ``recbole_runner.py``); with
   ``--teacher-out T`` (one model, one seed; top-50 unless ``--teacher-top-n``) it is imported
   as the teacher folder ``T`` (``recbole_teacher.py``: the same as ``python -m teacher import
   ... --score-kind logit``).

A run folder with a complete ``result.json`` (and, when asked for, the teacher files of the
same top-n) is reused unless ``--force``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dllm2rec.atomic import atomic_write_json, atomic_write_text
from dllm2rec.compare.recbole_teacher import (EMBEDDINGS, RANKINGS, check_teacher_args, check_teacher_rows,
                                              import_teacher, teacher_ready)
from dllm2rec.errors import ConfigError, DataError, TrainingError
from dllm2rec.readers import read_json

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "launch" / "recbole"
RUNNER = Path(__file__).resolve().with_name("recbole_runner.py")
MODELS = {"SASRec": "sasrec.yaml", "GRU4Rec": "gru4rec.yaml"}
KS = (10, 20)  # what RecBole reports (base.yaml topk)
OUR_KS = (1, 5, 10, 20, 50)  # what we recompute from the ranks
# RecBole rounds to metric_decimal_place (6 in base.yaml); allow for that plus float sums.
AGREE_TOL = 2e-6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="a prepared dataset folder (data prepare)")
    p.add_argument("--models", nargs="+", default=["SASRec", "GRU4Rec"], choices=sorted(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default="runs/recbole")
    p.add_argument("--epochs", type=int, default=None, help="epoch cap (default: base.yaml's 50)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per RecBole run")
    p.add_argument("--recbole-python", default=None,
                   help="python of the RecBole venv (default $RECBOLE_PYTHON or .venv-recbole)")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per run")
    p.add_argument("--force", action="store_true", help="rerun runs that already have results")
    p.add_argument("--teacher-top-n", type=int, default=None,
                   help="also write each run as a teacher: top-n logits for every train/valid/test row")
    p.add_argument("--teacher-out", default=None,
                   help="import the (single) run as this teacher folder (top-50 unless --teacher-top-n)")


def recbole_python(explicit: str | None = None) -> Path:
    """The RecBole venv's interpreter; ConfigError with the install command if it is missing."""
    cand = explicit or os.environ.get("RECBOLE_PYTHON") or str(REPO / ".venv-recbole" / "bin" / "python")
    if not Path(cand).is_file():
        raise ConfigError(f"RecBole python {cand} not found: create the optional venv with "
                          f"'bash launch/recbole_env.sh' or pass --recbole-python")
    return Path(cand)


def metrics_from_ranks(ranks: np.ndarray, ks=OUR_KS) -> dict[str, float]:
    """Our HR@K / NDCG@K (``dllm2rec.eval.metrics.hr_ndcg``) from 1-based target ranks [R]."""
    import torch

    from dllm2rec.eval.metrics import hr_ndcg

    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0 or (ranks < 1).any():
        raise DataError("ranks", "ranks must be a non-empty array of 1-based ranks")
    return hr_ndcg(torch.from_numpy(ranks), ks=ks)


def check_ranks(row_rank: np.ndarray, test_row_ids: np.ndarray, n_items: int, where: object) -> np.ndarray:
    """Validate the runner's (row_id, rank) pairs against our test split; return ranks in split order."""
    if row_rank.ndim != 2 or row_rank.shape[1] != 2:
        raise DataError(where, f"expected an [R, 2] array, got shape {row_rank.shape}")
    if len(row_rank) != len(test_row_ids) or set(row_rank[:, 0].tolist()) != set(test_row_ids.tolist()):
        raise DataError(where, f"RecBole ranked {len(row_rank)} rows; they are not exactly the "
                               f"{len(test_row_ids)} test rows of the dataset")
    ranks = row_rank[:, 1]
    if (ranks < 1).any() or (ranks > n_items).any():
        raise DataError(where, f"a rank lies outside 1..{n_items}")
    order = {int(r): i for i, r in enumerate(row_rank[:, 0])}
    return ranks[[order[int(r)] for r in test_row_ids]]


def run_one(py: Path, data_path: Path, rb_name: str, model: str, seed: int, run_dir: Path,
            n_items: int, epochs: int | None, threads: int, timeout: float,
            teacher_top_n: int | None = None) -> dict:
    """Run recbole_runner.py for one (model, seed); return its runner.json plus the command."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(RUNNER), "--data-path", str(data_path.resolve()), "--dataset", rb_name,
           "--model", model, "--seed", str(seed), "--out", str(run_dir.resolve()),
           "--config", str(CONFIG_DIR / "base.yaml"), "--config", str(CONFIG_DIR / MODELS[model]),
           "--threads", str(threads), "--n-items", str(n_items)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if teacher_top_n is not None:
        cmd += ["--teacher-top-n", str(teacher_top_n)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    for stale in ("runner.json", RANKINGS, EMBEDDINGS):  # never pair new results with old files
        (run_dir / stale).unlink(missing_ok=True)
    t0 = time.time()
    with open(run_dir / "recbole.log", "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired as exc:
            raise TrainingError(f"RecBole {model} seed {seed} exceeded {timeout:.0f} s; "
                                f"see {run_dir / 'recbole.log'}") from exc
    if rc != 0 or not (run_dir / "runner.json").is_file():
        tail = (run_dir / "recbole.log").read_text(encoding="utf-8", errors="replace")[-1500:]
        raise TrainingError(f"RecBole {model} seed {seed} failed (exit {rc}); "
                            f"log {run_dir / 'recbole.log'}:\n{tail}")
    res = read_json(run_dir / "runner.json")
    return {**res, "command": shlex.join(cmd), "wall_seconds": round(time.time() - t0, 1)}


def finish_run(raw: dict, run_dir: Path, ds) -> dict:
    """Cross-check RecBole's test metrics with ours from the saved ranks; write result.json."""
    if raw["rows"] != ds.manifest["counts"]:
        raise DataError(run_dir / "runner.json", f"RecBole used rows {raw['rows']}, the dataset has "
                                                 f"{ds.manifest['counts']}: it filtered or re-split them")
    where = run_dir / "test_ranks.npy"
    try:
        row_rank = np.load(where, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # cut .npy header or data
        raise DataError(where, f"truncated or corrupt .npy file ({exc})") from exc
    ranks = check_ranks(row_rank, ds.splits["test"]["row_id"], int(ds.manifest["n_items"]), where)
    ours = metrics_from_ranks(ranks)
    diff = max(max(abs(ours[f"hr@{k}"] - raw["test"][f"hit@{k}"]),
                   abs(ours[f"ndcg@{k}"] - raw["test"][f"ndcg@{k}"])) for k in KS)
    result = {"schema": "dllm2rec.recbole_result/1", "dataset": str(ds.path),
              "id_map_hash": ds.manifest["id_map_hash"], "model": raw["model"], "seed": raw["seed"],
              "recbole": raw, "test_ours": ours, "metrics_max_abs_diff": diff,
              "metrics_agree": bool(diff <= AGREE_TOL),
              "selection": "best valid NDCG@20 epoch (RecBole early stopping, patience 10)",
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "complete": True}
    atomic_write_json(run_dir / "result.json", result)
    return result


def summarize(results: list[dict]) -> tuple[list[dict], str]:
    """Mean and std over seeds per model and a markdown table."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == model]
        row = {"model": model, "seeds": [r["seed"] for r in rs]}
        for k in ("hit@10", "hit@20", "ndcg@10", "ndcg@20"):
            v = np.array([r["recbole"]["test"][k] for r in rs])
            row[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        row["best_epochs"] = [r["recbole"]["best_epoch"] for r in rs]
        row["epochs_run"] = [r["recbole"]["epochs_run"] for r in rs]
        row["epochs_cap"] = rs[0]["recbole"]["epochs_cap"]
        row["train_seconds"] = [r["recbole"]["train_seconds"] for r in rs]
        row["metrics_agree"] = all(r["metrics_agree"] for r in rs)
        rows.append(row)
    lines = ["| RecBole 1.2.1 model | seeds | test HR@10 | test HR@20 | test NDCG@10 | test NDCG@20 "
             "| best epoch | epochs run (cap) | train s | our metrics agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in ("hit@10", "hit@20", "ndcg@10", "ndcg@20")]
        lines.append(f"| {r['model']} | {' '.join(map(str, r['seeds']))} | " + " | ".join(cells)
                     + f" | {' '.join(map(str, r['best_epochs']))} | {' '.join(map(str, r['epochs_run']))}"
                       f" ({r['epochs_cap']}) | {' '.join(f'{s:.0f}' for s in r['train_seconds'])}"
                       f" | {'yes' if r['metrics_agree'] else 'NO'} |")
    return rows, "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.compare.recbole_export import export_recbole

    py = recbole_python(args.recbole_python)
    ds = load_dataset(args.dataset)
    out = Path(args.out)
    rb_name = f"dllm2rec-{ds.manifest['name']}"
    n_items = int(ds.manifest["n_items"])
    top_n = check_teacher_args(args.teacher_top_n, args.teacher_out, len(args.models) * len(args.seeds), n_items)
    export_recbole(ds, out / "atomic" / rb_name, name=rb_name)
    results = []
    for model in args.models:
        for seed in args.seeds:
            run_dir = out / "runs" / f"{model}-seed{seed}"
            done = run_dir / "result.json"
            if done.is_file() and not args.force:
                res = read_json(done)
                if (res.get("complete") and res.get("id_map_hash") == ds.manifest["id_map_hash"]
                        and teacher_ready(res["recbole"], run_dir, top_n)):
                    print(f"[recbole] {model} seed {seed}: reusing {done}", file=sys.stderr)
                    if top_n is not None:
                        check_teacher_rows(res["recbole"], run_dir, ds.manifest["counts"])
                    results.append(res)
                    continue
            print(f"[recbole] {model} seed {seed}: training (log {run_dir / 'recbole.log'})", file=sys.stderr)
            raw = run_one(py, out / "atomic", rb_name, model, seed, run_dir, n_items,
                          args.epochs, args.threads, args.timeout, top_n)
            if top_n is not None:
                check_teacher_rows(raw, run_dir, ds.manifest["counts"])
            res = finish_run(raw, run_dir, ds)
            if not res["metrics_agree"]:
                print(f"[recbole] WARNING {model} seed {seed}: RecBole's test metrics differ from "
                      f"ours by {res['metrics_max_abs_diff']:.2e}", file=sys.stderr)
            results.append(res)
    rows, table = summarize(results)
    atomic_write_json(out / "results.json", {"dataset": str(ds.path), "rows": rows, "runs": results})
    atomic_write_text(out / "results.md", f"RecBole on `{ds.path}` (N = {n_items} items)\n\n" + table)
    print(table)
    if args.teacher_out is not None:
        res = results[0]
        man = import_teacher(out / "runs" / f"{res['model']}-seed{res['seed']}", ds.path, args.teacher_out,
                             res["model"], res["seed"])
        hr20 = {s: f"{m['hr@20']:.4f}" for s, m in man["metrics"].items() if "hr@20" in m}
        print(f"[recbole] teacher folder {args.teacher_out}: top-{man['top_n']}, HR@20 {hr20}", file=sys.stderr)
    return 0
