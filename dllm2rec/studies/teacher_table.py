"""Teacher variants side by side (``python -m dllm2rec analyze teachers``): the issue's teacher table.

For each teacher folder (``label=path``), on the rows of ``split`` that the teacher ranks, with
the plain student run ``--before`` and popularity as references on exactly those rows:
HR@k / NDCG@k (from the position of the target in the teacher's top-k list), distinct items in
its top-k lists, the share of its top-k slots the student's top-k also holds (overlap), the hit
rate of the teacher-only part (paper Table 3: rows whose target is in the teacher's list and not
in the student's), and whether the manifest says the teacher uses collaborative information.

``teacher_table(teachers, dataset, before, split, k) -> list[dict]``; ``table_markdown(rows)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dllm2rec.studies.rankings import student_topk, teacher_topk


def list_metrics(top: np.ndarray, target: np.ndarray) -> dict:
    """HR@k, NDCG@k (one relevant item) and distinct items of top-k lists ``top`` Long[R, k]."""
    pos = np.argmax(top == target[:, None], axis=1)
    hit = (top == target[:, None]).any(axis=1)
    gain = np.where(hit, 1.0 / np.log2(pos + 2.0), 0.0)
    return {"hr": float(hit.mean()) if len(hit) else 0.0, "ndcg": float(gain.mean()) if len(gain) else 0.0,
            "distinct_items": int(len(np.unique(top)))}


def _collaborative(teacher: Path) -> str:
    try:
        m = json.loads((teacher / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "?"
    if m.get("collaborative"):
        c = m.get("collab") or {}
        return f"yes ({c.get('kind')}, gamma {c.get('gamma')})"
    kind = (m.get("source") or {}).get("kind", "")
    if kind.startswith("from-run"):  # a trained student (or an ensemble of them) IS a collaborative model
        return "yes (trained on the interactions)"
    if kind == "import":
        return "? (imported: not declared)"
    return "no"


def teacher_table(teachers: dict[str, str], dataset: str, before: str, split: str = "valid", k: int = 20) -> list[dict]:
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.serve.student import load_student
    from dllm2rec.studies.teacher_profile import popularity_ranking

    ds = load_dataset(dataset)
    cols = ds.splits[split]
    row_ids, targets = np.asarray(cols["row_id"], np.int64), np.asarray(cols["target"], np.int64)
    s_top = student_topk(load_student(before, dataset), ds, split, k).numpy()
    pop = popularity_ranking(ds.splits["train"]["target"], ds.n_items)[:k]
    rows = []
    for label, path in teachers.items():
        keep, t_top = teacher_topk(path, split, row_ids, k)
        tgt, st = targets[keep], s_top[keep]
        t_hit = (t_top == tgt[:, None]).any(1)
        s_hit = (st == tgt[:, None]).any(1)
        both = (t_top[:, :, None] == st[:, None, :]).any(-1).sum(1)
        ref_pop = list_metrics(np.broadcast_to(pop, (len(keep), k)), tgt)
        ref_student = list_metrics(st, tgt)
        rows.append({
            "teacher": label, "path": str(path), "split": split, "rows": int(len(keep)), "k": k,
            **{f"{m}@{k}": v for m, v in list_metrics(t_top, tgt).items() if m != "distinct_items"},
            "distinct_items": list_metrics(t_top, tgt)["distinct_items"],
            "overlap_share": float(both.mean() / k) if len(keep) else 0.0,
            "teacher_only_hit_rate": float((t_hit & ~s_hit).mean()) if len(keep) else 0.0,
            "collaborative": _collaborative(Path(path)),
            "student": {f"hr@{k}": ref_student["hr"], f"ndcg@{k}": ref_student["ndcg"],
                        "distinct_items": ref_student["distinct_items"]},
            "popularity": {f"hr@{k}": ref_pop["hr"], f"ndcg@{k}": ref_pop["ndcg"]},
        })
    return rows


def table_markdown(rows: list[dict], before: str) -> str:
    if not rows:
        return "(no teachers)\n"
    k, split = rows[0]["k"], rows[0]["split"]
    lines = [f"| teacher | {split} rows | HR@{k} | NDCG@{k} | distinct items in top-{k} | overlap with student top-{k} "
             f"| teacher-only hit rate | collaborative | student HR@{k} / NDCG@{k} (same rows) | popularity HR@{k} / NDCG@{k} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, p = r["student"], r["popularity"]
        lines.append(f"| {r['teacher']} | {r['rows']} | {r[f'hr@{k}']:.4f} | {r[f'ndcg@{k}']:.4f} | {r['distinct_items']} | "
                     f"{100 * r['overlap_share']:.1f}% | {100 * r['teacher_only_hit_rate']:.2f}% | {r['collaborative']} | "
                     f"{s[f'hr@{k}']:.4f} / {s[f'ndcg@{k}']:.4f} | {p[f'hr@{k}']:.4f} / {p[f'ndcg@{k}']:.4f} |")
    lines += ["", f"Student: `{before}` (no distillation). Teacher-only hit rate: share of rows whose target is in "
                  f"the teacher's top-{k} and not in the student's (paper Table 3)."]
    return "\n".join(lines) + "\n"


def run_teacher_table(args) -> None:
    from dllm2rec.atomic import atomic_write_json, atomic_write_text
    from dllm2rec.errors import ConfigError

    teachers = {}
    for spec in args.teachers:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--teachers: expected label=path, got {spec!r}")
        teachers[label] = path
    rows = teacher_table(teachers, args.dataset, args.before, args.split, args.k)
    out = Path(args.out)
    atomic_write_json(out / "teacher_table.json", rows)
    md = table_markdown(rows, args.before)
    atomic_write_text(out / "teacher_table.md", md)
    print(md)


def add_arguments(p) -> None:
    p.add_argument("--teachers", nargs="+", required=True, help="label=teacher_folder ...")
    p.add_argument("--dataset", required=True)
    p.add_argument("--before", required=True, help="plain student run (no distillation)")
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", required=True, help="folder for teacher_table.{json,md}")

