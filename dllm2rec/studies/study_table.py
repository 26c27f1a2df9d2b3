"""The results table of a study (``dllm2rec.studies.experiment``): aggregation over seeds + files.

For every (student, variant): the test HR@K / NDCG@K of each finished seed (``results.json``
``test``, i.e. at the epoch selected by the run's protocol; the protocol label is carried into
the table) and its validation NDCG@K at that epoch (the selection metric, ``results.json`` ``valid``), mean and sample standard deviation (ddof = 1; 0 with one seed), the number of
seeds, and the relative gain of the mean over the same student's ``none`` variant:
``100 * (mean_variant - mean_none) / mean_none`` (None when ``none`` is missing or 0), with the
sample std of the per-seed gains against the same seed's ``none`` run (``*_gain_std``).
The teacher's own test metrics come from its manifest ``metrics.test`` or, failing that, from
``rank_test.parquet`` ``target_rank``; otherwise the table says they are unavailable.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from dllm2rec.readers import read_json

METRICS = ("hr", "ndcg")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gain(value: float | None, base: float | None) -> float | None:
    """Relative gain in percent of ``value`` over ``base`` (None when undefined)."""
    if value is None or base is None or base == 0:
        return None
    return 100.0 * (value - base) / base


def teacher_metrics(teacher: str | Path, k: int, split: str = "test") -> dict | None:
    """{"hr@k", "ndcg@k", "source"} of the teacher on ``split`` or None when the folder lacks them."""
    folder = Path(teacher)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            m = (json.loads(manifest.read_text(encoding="utf-8")).get("metrics") or {}).get(split) or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            m = {}
        if f"hr@{k}" in m and f"ndcg@{k}" in m:
            return {f"hr@{k}": float(m[f"hr@{k}"]), f"ndcg@{k}": float(m[f"ndcg@{k}"]),
                    "source": f"{manifest} metrics.{split}"}
    rank_file = folder / f"rank_{split}.parquet"
    if rank_file.is_file():
        import torch

        from dllm2rec.eval.metrics import hr_ndcg
        from dllm2rec.readers import read_parquet, read_parquet_names

        if "target_rank" in read_parquet_names(rank_file):
            ranks = torch.from_numpy(read_parquet(rank_file, columns=["target_rank"]).column(0).to_numpy())
            m = hr_ndcg(ranks, (k,))
            return {**m, "source": f"{rank_file} target_rank"}
    return None


def collect(grid, k: int) -> list[dict]:
    """One row per (student, variant) in grid order, with per-seed values and aggregates."""
    groups: dict[tuple[str, str], dict] = {}
    for cell in grid:
        g = groups.setdefault((cell.student, cell.variant), {"student": cell.student, "variant": cell.variant,
                                                             "seeds": [], "runs": [], "protocols": set(),
                                                             f"valid_ndcg@{k}_values": [],
                                                             **{f"{m}@{k}_values": [] for m in METRICS}})
        res_file = cell.run_dir / "results.json"
        if not res_file.is_file():
            continue
        res = read_json(res_file)
        test = res.get("test") or {}
        if any(f"{m}@{k}" not in test for m in METRICS):
            continue
        g["seeds"].append(cell.seed)
        g["runs"].append(str(cell.run_dir))
        g["protocols"].add(res.get("protocol", "unknown"))
        for m in METRICS:
            g[f"{m}@{k}_values"].append(float(test[f"{m}@{k}"]))
        valid = (res.get("valid") or {}).get(f"ndcg@{k}")
        if valid is not None:  # the selection metric at the selected epoch (older runs may lack it)
            g[f"valid_ndcg@{k}_values"].append(float(valid))
    rows = []
    for g in groups.values():
        for m in (*METRICS, "valid_ndcg"):
            g[f"{m}@{k}_mean"], g[f"{m}@{k}_std"] = _mean_std(g[f"{m}@{k}_values"])
        g["n"] = len(g["seeds"])
        g["protocols"] = sorted(g["protocols"])
        rows.append(g)
    base = {r["student"]: r for r in rows if r["variant"] == "none"}
    for r in rows:
        b = base.get(r["student"])
        for m in METRICS:
            r[f"{m}@{k}_gain_pct"] = (None if r["variant"] == "none" or b is None
                                      else gain(r[f"{m}@{k}_mean"], b[f"{m}@{k}_mean"]))
            r[f"{m}@{k}_gain_std"] = None if r["variant"] == "none" or b is None else paired_gain_std(r, b, f"{m}@{k}")
    return rows


def paired_gain_std(row: dict, base: dict, metric: str) -> float | None:
    """Sample std over seeds of the per-seed gain (%) against the same seed's ``none`` run; None
    with fewer than two seeds finished in both."""
    b = dict(zip(base["seeds"], base[f"{metric}_values"]))
    gains = [gain(v, b[s]) for s, v in zip(row["seeds"], row[f"{metric}_values"]) if s in b]
    gains = [g for g in gains if g is not None]
    return statistics.stdev(gains) if len(gains) > 1 else None


def _fmt(mean, std) -> str:
    return "—" if mean is None else f"{mean:.4f} ± {std:.4f}"


def _pct(v, std=None) -> str:
    return "" if v is None else f"{v:+.1f}%" + ("" if std is None else f" ± {std:.1f}")


def markdown(name: str, rows: list[dict], k: int, teacher: dict | None, failures: dict, stale: dict,
             teacher_dir: str = "") -> str:
    protocols = sorted({p for r in rows for p in r["protocols"]})
    standard = all(p.startswith("standard") for p in protocols)
    lines = [f"# Study {name}: test metrics at the epoch selected "
             f"{'on validation' if standard else '(NOT all on validation: see the protocols below)'}", "",
             "Mean ± sample std over seeds; gain = relative change of the mean over the same student without "
             "distillation (variant `none`), ± the sample std of the per-seed gains against the same seed's "
             "`none` run (shown with >= 2 paired seeds).", "",
             f"| student | variant | n | valid NDCG@{k} | HR@{k} | NDCG@{k} | gain HR@{k} | gain NDCG@{k} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["n"]):
        lines.append(f"| {r['student']} | {r['variant']} | {r['n']} | {_fmt(r[f'valid_ndcg@{k}_mean'], r[f'valid_ndcg@{k}_std'])} | "
                     f"{_fmt(r[f'hr@{k}_mean'], r[f'hr@{k}_std'])} | "
                     f"{_fmt(r[f'ndcg@{k}_mean'], r[f'ndcg@{k}_std'])} | {_pct(r[f'hr@{k}_gain_pct'], r[f'hr@{k}_gain_std'])} | "
                     f"{_pct(r[f'ndcg@{k}_gain_pct'], r[f'ndcg@{k}_gain_std'])} |")
    lines.append("")
    if teacher:
        lines.append(f"Teacher on test: HR@{k} {teacher[f'hr@{k}']:.4f}, NDCG@{k} {teacher[f'ndcg@{k}']:.4f} "
                     f"(from {teacher['source']}).")
    else:
        lines.append(f"Teacher test metrics: not available ({teacher_dir or 'the teacher folder'} has no metrics.test in "
                     "its manifest.json and no rank_test.parquet with target_rank).")
    if protocols:
        lines.append(f"Protocol(s): {'; '.join(protocols)}.")
    missing = [f"{r['student']}/{r['variant']}" for r in rows if r["n"] == 0]
    if missing:
        lines.append(f"No finished run yet ({len(missing)} of {len(rows)}): {', '.join(missing)}.")
    for label, err in sorted(failures.items()):
        lines.append(f"FAILED {label}: {err}")
    for label, keys in sorted(stale.items()):
        lines.append(f"STALE (cached with another config: {', '.join(keys)}) {label}")
    return "\n".join(lines) + "\n"


def write_outputs(study, grid, failures: dict, stale: dict) -> dict:
    """Write ``results.json``, ``results.md`` and ``results.png`` under ``study.out``; returns the JSON."""
    from dllm2rec.studies import plots
    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    k = study.k
    rows = collect(grid, k)
    teacher = teacher_metrics(study.teacher, k)
    md = markdown(study.name, rows, k, teacher, failures, stale, str(study.teacher))
    out = Path(study.out)
    result = {"schema": "dllm2rec.study/1", "study": study.path, "name": study.name, "k": k, "rows": rows,
              "teacher": teacher, "failures": failures, "stale": stale, "markdown": md}
    atomic_write_json(out / "results.json", _finite(result))
    atomic_write_text(out / "results.md", md)
    finished = [r for r in rows if r["n"]]
    if finished:
        plots.study_bars(finished, k, teacher, out / "results.png", title=f"Study {study.name}: test metrics (mean ± std)")
    return result


def _finite(obj):
    """JSON has no NaN: map non-finite floats to None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
