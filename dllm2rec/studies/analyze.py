"""Teacher/student diagnostics: ``python -m dllm2rec analyze <what> ...``.

- ``overlap --teacher T --before RUN [--after RUN] [--split test] [--k 20] --out DIR``:
  per student run, against the teacher's top-k of the same rows (``rank_<split>.parquet``
  ``topk_ids``, aligned by ``row_id``):
  * paper Table 3: shares of the k list slots that are teacher-only / in both lists /
    student-only, and the hit rate of each part (= share of rows whose target lies in that part;
    the three sum to the hit rate of the union) plus its precision (hits / items in the part);
  * paper Table 7: the overlap share before vs after distillation (one line per run);
  * paper Table 2: share of rows where the teacher hits@k and the student misses, and vice versa
    (both / neither too).
  Writes ``overlap.json``, ``overlap.md``, ``overlap.png`` (stacked shares), ``part_hits.png``.
- ``rd-weights --teacher T [--run RUN] --out DIR``: distribution of the RD importance weights
  (``dllm2rec.losses.distill.rd_weights``) over the training rows, with the RD settings of RUN's
  config (defaults otherwise); consistency comes from RUN's student top-K or is 0 everywhere.
  Writes ``rd_weights.png`` (histogram + mean per position) and ``rd_weights.json``.
- ``teachers --teachers label=T ... --before RUN --dataset D``: the teacher-variant table
  (``dllm2rec.studies.teacher_table``).
- ``latency``: see ``dllm2rec.studies.latency``. ``curves --runs A B ... --out x.png``: validation
  metric per epoch per run from ``metrics.jsonl`` (one PNG).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dllm2rec.errors import ConfigError, DataError, ManifestError
from dllm2rec.studies.rankings import dataset_path, student_topk, teacher_topk

PARTS = ("teacher_only", "overlap", "student_only")


def overlap_stats(teacher_top: torch.Tensor, student_top: torch.Tensor, target: torch.Tensor) -> dict:
    """Overlap diagnostics of two top-k lists per row.

    teacher_top, student_top: Long[R, k] (ids unique within a row), target: Long[R].
    Returns shares of the k slots per part (teacher_only + overlap = 1 = overlap + student_only),
    hit rates per part (share of rows), precision per part, teacher/student HR@k and the
    Table-2 shares (teacher_beats_student, student_beats_teacher, both_hit, neither_hit).
    """
    r, k = student_top.shape
    if teacher_top.shape != (r, k) or target.shape != (r,):
        raise ValueError(f"shapes differ: teacher {tuple(teacher_top.shape)}, student {tuple(student_top.shape)}, "
                         f"target {tuple(target.shape)}")
    in_teacher = (student_top[:, :, None] == teacher_top[:, None, :]).any(-1)  # Bool[R, k]
    n_both = in_teacher.sum(1).double()
    t_hit = (teacher_top == target[:, None]).any(1)
    s_hit = (student_top == target[:, None]).any(1)
    hits = {"teacher_only": t_hit & ~s_hit, "overlap": t_hit & s_hit, "student_only": s_hit & ~t_hit}
    items = {"teacher_only": float((k - n_both).sum()), "overlap": float(n_both.sum()),
             "student_only": float((k - n_both).sum())}
    rows = max(r, 1)
    return {
        "rows": r, "k": k,
        "share": {p: items[p] / (rows * k) for p in PARTS},
        "hit_rate": {p: float(hits[p].sum()) / rows for p in PARTS},
        "precision": {p: (float(hits[p].sum()) / items[p] if items[p] else None) for p in PARTS},
        "teacher_hr": float(t_hit.sum()) / rows, "student_hr": float(s_hit.sum()) / rows,
        "teacher_beats_student": float((t_hit & ~s_hit).sum()) / rows,
        "student_beats_teacher": float((s_hit & ~t_hit).sum()) / rows,
        "both_hit": float((t_hit & s_hit).sum()) / rows, "neither_hit": float((~t_hit & ~s_hit).sum()) / rows,
    }


def analyze_overlap(teacher: str, runs: dict[str, str], split: str = "test", k: int = 20,
                    dataset: str | None = None) -> dict:
    """{label: overlap_stats} for each student run (``runs`` = {label: run folder})."""
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.serve.student import load_student

    result, ds_cache = {}, {}
    for label, run_dir in runs.items():
        student = load_student(run_dir, dataset)
        ds_path = dataset_path(student, dataset)
        ds = ds_cache.setdefault(str(ds_path), load_dataset(ds_path))
        if split not in ds.splits:
            raise ConfigError(f"{ds_path}: no split {split!r}")
        row_ids = np.asarray(ds.splits[split]["row_id"], dtype=np.int64)
        keep, t_top = teacher_topk(teacher, split, row_ids, k)
        s_top = student_topk(student, ds, split, k)[torch.from_numpy(keep)]
        target = torch.from_numpy(np.asarray(ds.splits[split]["target"], dtype=np.int64)[keep])
        stats = overlap_stats(torch.from_numpy(t_top), s_top, target)
        stats.update(run=str(run_dir), split=split, dataset_rows=len(row_ids))
        result[label] = stats
    return result


def overlap_markdown(result: dict, teacher: str) -> str:
    any_stats = next(iter(result.values()))
    k, split = any_stats["k"], any_stats["split"]
    lines = [f"# Teacher ({teacher}) vs student top-{k} on {split}", "",
             f"## Where the top-{k} items come from (paper Table 3)", "",
             "| run | rows | teacher-only share | overlap share | student-only share | hit teacher-only | hit overlap "
             "| hit student-only | precision teacher-only | precision overlap | precision student-only |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "—" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for label, s in result.items():
        lines.append(f"| {label} | {s['rows']} | " + " | ".join(pct(s["share"][p]) for p in PARTS) + " | "
                     + " | ".join(pct(s["hit_rate"][p]) for p in PARTS) + " | "
                     + " | ".join(pct(s["precision"][p]) for p in PARTS) + " |")
    lines += ["", "Hit rate of a part = share of rows whose target lies in that part (the three sum to the "
                  "union's hit rate); precision = hits / items recommended in that part.", "",
              "## Overlap before vs after distillation (paper Table 7)", "",
              f"| run | overlap share of top-{k} | student HR@{k} | teacher HR@{k} |", "|---|---|---|---|"]
    for label, s in result.items():
        lines.append(f"| {label} | {pct(s['share']['overlap'])} | {s['student_hr']:.4f} | {s['teacher_hr']:.4f} |")
    lines += ["", "## Who hits where the other misses (paper Table 2)", "",
              "| run | teacher hits, student misses | student hits, teacher misses | both hit | neither |",
              "|---|---|---|---|---|"]
    for label, s in result.items():
        lines.append(f"| {label} | {pct(s['teacher_beats_student'])} | {pct(s['student_beats_teacher'])} | "
                     f"{pct(s['both_hit'])} | {pct(s['neither_hit'])} |")
    partial = [f"{lab}: {s['rows']} of {s['dataset_rows']}" for lab, s in result.items() if s["rows"] < s["dataset_rows"]]
    if partial:
        lines += ["", f"Note: the teacher ranks only part of the {split} rows ({'; '.join(partial)}); "
                      "only those rows are compared."]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def rd_weight_matrix(teacher_dir: str, dataset: str, run: str | None = None, rd_cfg=None,
                     batch_size: int | None = None) -> tuple[np.ndarray, str]:
    """RD weights Float[R_train, K] for every training row and a note on where consistency came from.

    Rows are processed in row order in batches of the run's ``train.batch_size`` (the paper
    variant normalises per batch)."""
    from dllm2rec.config import RDConfig, load_config
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.losses.distill import membership, rd_weights
    from dllm2rec.data.knowledge import load_teacher

    ds = load_dataset(dataset)
    tk = load_teacher(teacher_dir, ds, min_coverage=0.0)  # reading only: a partial teacher is fine
    cfg = load_config(Path(run) / "config.yaml") if run else None
    rd = rd_cfg or (cfg.distill.rd if cfg else RDConfig())
    if rd.k > tk.top_n:
        raise ConfigError(f"distill.rd.k = {rd.k} exceeds the teacher's top_n = {tk.top_n} ({teacher_dir})")
    bs = batch_size or (cfg.train.batch_size if cfg else 256)
    top = None
    if run:
        from dllm2rec.serve.student import load_student

        top = student_topk(load_student(run, dataset, teacher_dir), ds, "train", rd.k)
        note = f"consistency from the student top-{rd.k} of {run}"
    else:
        note = "consistency = 0 for every candidate (no student given)"
    rows = np.arange(len(tk.topk_ids)) if tk.covered is None else np.nonzero(tk.covered)[0]
    if tk.covered is not None:
        note += f"; the {len(rows)} training rows the teacher covers"
        top = None if top is None else top[torch.from_numpy(rows)]
    cand = torch.from_numpy(tk.topk_ids[rows, :rd.k])
    dist = torch.from_numpy(tk.topk_dist[rows, :rd.k])
    gt = None if tk.gt_dist is None else torch.from_numpy(tk.gt_dist[rows])
    out = []
    for s in range(0, len(cand), bs):
        c = cand[s:s + bs]
        member = membership(c, top[s:s + bs]) if top is not None else torch.zeros_like(c, dtype=torch.bool)
        out.append(rd_weights(dist[s:s + bs], member, None if gt is None else gt[s:s + bs], rd))
    return torch.cat(out).numpy(), note


def metric_curves(runs: list[str], metric: str = "ndcg@20", split: str = "valid") -> dict:
    """{label: (epochs, values)} from each run's ``metrics.jsonl`` (label = last 3 path parts)."""
    series = {}
    for run in runs:
        f = Path(run) / "metrics.jsonl"
        if not f.is_file():
            raise ManifestError(f"{f}: not found; not a student run folder (or no epoch finished yet)")
        xs, ys = [], []
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                value = (rec.get(split) or {})[metric]
                xs.append(int(rec["epoch"]))
                ys.append(float(value))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f, f"no {split} {metric} ({type(exc).__name__}: {exc})", row=n) from exc
        series["/".join(Path(run).resolve().parts[-3:])] = (xs, ys)
    return series


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="<what>", required=True)
    p = sub.add_parser("overlap", help="teacher vs student top-k overlap (paper Tables 2, 3, 7)")
    p.add_argument("--teacher", required=True, help="teacher folder with rank_<split>.parquet")
    p.add_argument("--before", required=True, help="student run without distillation")
    p.add_argument("--after", default=None, help="student run with distillation")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--dataset", default=None, help="dataset folder (default: the runs' config.yaml)")
    p.add_argument("--out", required=True, help="output folder for overlap.{json,md,png}, part_hits.png")
    p = sub.add_parser("rd-weights", help="histogram of the RD importance weights over training rows")
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", default=None, help="dataset folder (default: the run's, else the teacher manifest's)")
    p.add_argument("--run", default=None, help="student run: its RD settings and top-K for the consistency weight")
    p.add_argument("--out", required=True)
    p = sub.add_parser("curves", help="validation metric per epoch for several runs (one PNG)")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--metric", default="ndcg@20")
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    p.add_argument("--out", required=True, help="PNG file")
    p = sub.add_parser("teacher", help="teacher's ranking vs popularity and random; how varied its output is")
    p.add_argument("--teacher", required=True, help="teacher folder with rank_<split>.parquet")
    p.add_argument("--dataset", required=True, help="dataset folder")
    p.add_argument("--split", default="test", choices=["valid", "test", "train"])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", required=True, help="output folder for teacher_profile.{json,md}")
    from dllm2rec.studies.latency import add_arguments as latency_args
    from dllm2rec.studies.teacher_table import add_arguments as table_args

    table_args(sub.add_parser("teachers", help="teacher variants vs the plain student and popularity (one table)"))

    latency_args(sub.add_parser("latency", help="student full-ranking time vs the teacher's per-row cost"))


def run(args: argparse.Namespace) -> int:
    from dllm2rec.studies import plots
    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    if args.what == "latency":
        from dllm2rec.studies.latency import run as latency_run

        return latency_run(args)
    if args.what == "teachers":
        from dllm2rec.studies.teacher_table import run_teacher_table

        run_teacher_table(args)
        return 0
    if args.what == "curves":
        series = metric_curves(args.runs, args.metric, args.split)
        plots.curves(series, args.out, f"{args.split} {args.metric.upper()}", f"{args.split} {args.metric.upper()} per epoch")
        print(f"wrote {args.out}")
        return 0
    out = Path(args.out)
    if args.what == "teacher":
        from dllm2rec.studies.teacher_profile import profile_markdown, profile_teacher

        if args.k <= 0:
            raise ConfigError("--k must be positive")
        prof = profile_teacher(args.teacher, args.dataset, args.split, args.k)
        atomic_write_json(out / "teacher_profile.json", prof)
        atomic_write_text(out / "teacher_profile.md", profile_markdown(prof))
        print(profile_markdown(prof))
        return 0
    if args.what == "overlap":
        if args.k <= 0:
            raise ConfigError("--k must be positive")
        runs = {"before": args.before, **({"after": args.after} if args.after else {})}
        result = analyze_overlap(args.teacher, runs, args.split, args.k, args.dataset)
        md = overlap_markdown(result, args.teacher)
        atomic_write_json(out / "overlap.json", {"teacher": args.teacher, "runs": result})
        atomic_write_text(out / "overlap.md", md)
        plots.overlap_bars({lab: s["share"] for lab, s in result.items()}, args.k, out / "overlap.png")
        plots.part_hit_bars({lab: s["hit_rate"] for lab, s in result.items()}, args.k, out / "part_hits.png")
        print(md)
        return 0
    dataset = args.dataset
    if dataset is None and args.run:
        from dllm2rec.config import load_config

        dataset = load_config(Path(args.run) / "config.yaml").data.path
    if dataset is None:
        from dllm2rec.readers import read_json

        dataset = read_json(Path(args.teacher) / "manifest.json").get("dataset") \
            if (Path(args.teacher) / "manifest.json").is_file() else None
    if not dataset:
        raise ConfigError(f"{args.teacher}: its manifest names no dataset; pass --dataset")
    w, note = rd_weight_matrix(args.teacher, dataset, args.run)
    by_pos = w.mean(0)
    q = np.quantile(w, [0.0, 0.1, 0.5, 0.9, 1.0])
    summary = {"teacher": args.teacher, "dataset": str(dataset), "run": args.run, "rows": int(w.shape[0]),
               "k": int(w.shape[1]), "consistency": note, "mean": float(w.mean()), "std": float(w.std()),
               "quantiles": dict(zip(["min", "p10", "p50", "p90", "max"], map(float, q))),
               "mean_by_position": by_pos.tolist(), "row_sum_mean": float(w.sum(1).mean())}
    atomic_write_json(out / "rd_weights.json", summary)
    plots.histogram(w, out / "rd_weights.png", "RD weight", f"RD weights over {w.shape[0]} training rows x K={w.shape[1]}",
                    by_position=by_pos)
    print(json.dumps(summary, indent=2))
    return 0
