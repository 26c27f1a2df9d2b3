"""A study: a grid of student runs (students x variants x seeds) and ONE results table.

``python -m dllm2rec experiment --study launch/configs/study_ml100k.yaml [--jobs N]
[--threads-per-job T] [--only student=sasrec variant=none,dllm2rec seed=0] [--set train.epochs=5]
[--dry-run] [--table-only] [--rerun-stale]``

Study YAML (paths are relative to the directory the command runs in, like run configs)::

    base: launch/configs/student.yaml  # run config every cell starts from (null = RunConfig defaults)
    dataset: runs/data/ml-100k          # -> data.path
    teacher: runs/teacher/ml-100k       # -> distill.teacher (also read for the teacher's own metrics)
    out: runs/study/ml100k
    seeds: [0, 1, 2]
    students: [gru4rec, sasrec, dros]   # names from STUDENTS (or ``define.students``)
    variants: [none, dllm2rec, ...]     # names from VARIANTS (or ``define.variants``)
    overrides: [train.epochs=200]       # applied to every run, before the cell's own overrides
    define: {students: {name: [overrides]}, variants: {name: [overrides]}}   # optional additions

Each cell = base + overrides + student overrides + variant overrides + ``train.seed`` /
``train.output_dir`` / ``data.path`` / ``distill.teacher``; it trains into
``<out>/<student>/<variant>/seed<k>/`` with ``dllm2rec.train.loop.train`` and is SKIPPED when that
folder already has ``results.json`` (a half-finished run is resumed from its checkpoint). A
cached run whose ``config.yaml`` differs from what the study now resolves is reported as stale
(``--rerun-stale`` deletes and retrains it). Each cell is trained while holding
``<run>.lock`` (``dllm2rec.studies.cell_run``): several invocations over the same study (queue
workers) share the grid, a cell held by another live process is skipped and reported, and a cell
finished meanwhile is not retrained. ``--jobs 1`` trains in this process; ``--jobs N > 1``
runs each cell as a child process (``python -m dllm2rec.studies.cell_run`` worker, log in
``<run>/train.log``), one GPU per job when GPUs exist. Every run uses
``torch.set_num_threads(threads_per_job)``.

Outputs: ``<out>/results.json`` / ``results.md`` (mean ± sample std over seeds of test HR@K and
NDCG@K at the epoch selected on validation, n seeds, relative gain over the same student's
``none`` variant, the teacher's own test metrics when its folder has them) and
``<out>/results.png`` (bar chart); see ``dllm2rec.studies.study_table``.
"""
from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dllm2rec.errors import ConfigError
from dllm2rec.config import read_yaml
from dllm2rec.studies.cell_run import BUSY, FINISHED, changed_keys, lock_path, train_cell

STUDENTS: dict[str, list[str]] = {
    "gru4rec": ["model.name=gru4rec", "loss.dro_alpha=0.0"],
    "sasrec": ["model.name=sasrec", "loss.dro_alpha=0.0"],
    "dros": ["model.name=sasrec", "loss.dro_alpha=1.0"],  # DROS = SASRec + the DRO term
    "caser": ["model.name=caser", "loss.dro_alpha=0.0"],
}
_FULL = ["distill.rd.enabled=true", "distill.ed.enabled=true"]
VARIANTS: dict[str, list[str]] = {
    "none": ["distill.rd.enabled=false", "distill.ed.enabled=false"],
    "dllm2rec": _FULL,
    "rd_only": ["distill.rd.enabled=true", "distill.ed.enabled=false"],
    "ed_only": ["distill.rd.enabled=false", "distill.ed.enabled=true"],
    "no_position": _FULL + ["distill.rd.use_position=false"],
    "no_confidence": _FULL + ["distill.rd.use_confidence=false"],
    "no_consistency": _FULL + ["distill.rd.use_consistency=false"],
    "paper_variant": _FULL + ["distill.rd.variant=paper"],
    "ed_no_offset": _FULL + ["distill.ed.learnable_offset=false"],
}
_STUDY_KEYS = {"name", "base", "dataset", "teacher", "out", "seeds", "students", "variants", "overrides",
               "define", "k"}


@dataclass
class Study:
    path: str
    name: str
    base: str | None
    dataset: str
    teacher: str
    out: Path
    seeds: list[int]
    students: dict[str, list[str]]
    variants: dict[str, list[str]]
    overrides: list[str] = field(default_factory=list)
    k: int = 20


@dataclass
class Cell:
    student: str
    variant: str
    seed: int
    run_dir: Path
    overrides: list[str]

    @property
    def label(self) -> str:
        return f"{self.student}/{self.variant}/seed{self.seed}"


def _str_list(value, key: str, source: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{source}: '{key}' must be a list of 'section.key=value' strings, got {value!r}")
    return list(value)


def load_study(path: str | Path, out: str | None = None) -> Study:
    """Read and check a study YAML (unknown keys, unknown student/variant names, seeds)."""
    p = Path(path)
    raw = read_yaml(p, "study")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a study must be a mapping")
    unknown = sorted(set(raw) - _STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{p}: unknown study key(s) {unknown}; allowed: {sorted(_STUDY_KEYS)}")
    for key in ("dataset", "teacher", "out"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            if not (key == "out" and out):
                raise ConfigError(f"{p}: '{key}' must be a non-empty path string")
    define = raw.get("define") or {}
    if not isinstance(define, dict) or set(define) - {"students", "variants"}:
        raise ConfigError(f"{p}: 'define' may only hold 'students' and 'variants' mappings")
    students, variants = dict(STUDENTS), dict(VARIANTS)
    for name, ov in (define.get("students") or {}).items():
        students[str(name)] = _str_list(ov, f"define.students.{name}", str(p))
    for name, ov in (define.get("variants") or {}).items():
        variants[str(name)] = _str_list(ov, f"define.variants.{name}", str(p))
    chosen = {}
    for key, table in (("students", students), ("variants", variants)):
        names = raw.get(key)
        if not isinstance(names, list) or not names:
            raise ConfigError(f"{p}: '{key}' must be a non-empty list")
        bad = [n for n in names if n not in table]
        if bad:
            raise ConfigError(f"{p}: unknown {key} {bad}; known: {sorted(table)} (add more under define.{key})")
        for n in names:  # each name becomes a folder under 'out': it must not escape it
            if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n or "\\" in n:
                raise ConfigError(f"{p}: {key} name {n!r} must be a plain folder name (no '/', '\\', '..')")
        chosen[key] = {n: table[n] for n in names}
    if "none" not in chosen["variants"]:
        print(f"warning: {p}: no 'none' variant, so no gain over the plain student can be computed", file=sys.stderr)
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                             for s in seeds):
        raise ConfigError(f"{p}: 'seeds' must be a non-empty list of non-negative integers, got {seeds!r}")
    k = raw.get("k", 20)
    if not isinstance(k, int) or k <= 0:
        raise ConfigError(f"{p}: 'k' must be a positive integer, got {k!r}")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{p}: 'base' must be a path string or null")
    return Study(str(p), str(raw.get("name") or p.stem), base, raw["dataset"], raw["teacher"], Path(out or raw["out"]),
                 list(dict.fromkeys(seeds)), chosen["students"], chosen["variants"],
                 _str_list(raw.get("overrides"), "overrides", str(p)), k)


def parse_only(items: list[str]) -> dict[str, set[str]]:
    """``['student=sasrec', 'variant=none,dllm2rec', 'seed=0']`` -> {field: allowed values}."""
    out: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in ("student", "variant", "seed") or not values:
            raise ConfigError(f"--only {item!r}: expected student=..., variant=... or seed=... (comma-separated values)")
        out.setdefault(key, set()).update(v.strip() for v in values.split(",") if v.strip())
    return out


def cells(study: Study, only: dict[str, set[str]] | None = None, extra: list[str] | None = None) -> list[Cell]:
    """Every (student, variant, seed) of the grid that passes ``only``, with its overrides."""
    only = only or {}
    for key, known in (("student", study.students), ("variant", study.variants),
                       ("seed", {str(s) for s in study.seeds})):
        bad = sorted(only.get(key, set()) - set(known))
        if bad:
            raise ConfigError(f"--only {key}={','.join(bad)}: not in the study {study.path} (has {sorted(known)})")
    out = []
    for s_name, s_ov in study.students.items():
        for v_name, v_ov in study.variants.items():
            for seed in study.seeds:
                if any(key in only and value not in only[key]
                       for key, value in (("student", s_name), ("variant", v_name), ("seed", str(seed)))):
                    continue
                run_dir = study.out / s_name / v_name / f"seed{seed}"
                ov = [*study.overrides, *(extra or []), *s_ov, *v_ov, f"data.path={study.dataset}",
                      f"distill.teacher={study.teacher}", f"train.seed={seed}", f"train.output_dir={run_dir}",
                      "train.progress=false"]
                out.append(Cell(s_name, v_name, seed, run_dir, ov))
    return out


def resolve(study: Study, cell: Cell):
    from dllm2rec.config import load_config

    return load_config(study.base, cell.overrides)


def stale_keys(study: Study, cell: Cell) -> list[str]:
    """Config keys whose cached value (``<run>/config.yaml``) differs from the current resolution."""
    return changed_keys(cell.run_dir, resolve(study, cell))


def default_jobs() -> tuple[int, int]:
    """(jobs, number of GPUs): one job per GPU if any, else one per CPU core."""
    n_gpu = 0
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:  # a broken CUDA install must not stop a CPU study
        n_gpu = 0
    return (n_gpu if n_gpu else max(1, (os.cpu_count() or 1) // 1)), n_gpu


def _train_child(study: Study, cell: Cell, threads: int, gpu: int | None, rerun_stale: bool) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dllm2rec.studies.cell_run", str(threads), str(int(rerun_stale)),
           study.base or "-", *cell.overrides]
    log_file = cell.run_dir / "train.log"
    with open(log_file, "ab") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc == BUSY:
        from dllm2rec.lockfile import LockBusy, read_owner

        raise LockBusy(lock_path(cell.run_dir), read_owner(lock_path(cell.run_dir)))
    if rc not in (0, FINISHED):
        raise RuntimeError(f"exit status {rc}; see {log_file}")
    return "finished" if rc == FINISHED else "trained"


def run_cells(study: Study, todo: list[Cell], jobs: int, threads: int, n_gpu: int,
              rerun_stale: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """Train ``todo``; returns ({label: error} for failed runs, {label: reason} for cells skipped
    because another process holds or finished them). One failed cell does not stop the others."""
    from dllm2rec.lockfile import LockBusy

    failures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    done = [0]

    def one(cell: Cell, slot: int | None) -> None:
        t0 = time.time()
        try:
            if jobs == 1:
                outcome = train_cell(resolve(study, cell), threads, rerun_stale)
            else:
                outcome = _train_child(study, cell, threads, None if not n_gpu else slot % n_gpu, rerun_stale)
            status = "done" if outcome == "trained" else "skipped (finished by another worker)"
            if outcome != "trained":
                skipped[cell.label] = "finished by another worker"
        except LockBusy as exc:  # another worker trains it right now: not a failure
            skipped[cell.label] = str(exc)
            status = f"skipped (busy: {exc})"
        except Exception as exc:  # one failed cell must not lose the others
            failures[cell.label] = f"{type(exc).__name__}: {exc}"
            if jobs == 1:
                traceback.print_exc()
            status = f"FAILED ({failures[cell.label]})"
        done[0] += 1
        print(f"[{done[0]}/{len(todo)}] {cell.label}: {status} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)

    if jobs == 1:
        for cell in todo:
            one(cell, 0)
        return failures, skipped
    slots: queue.Queue = queue.Queue()
    for i in range(jobs):
        slots.put(i)

    def with_slot(cell: Cell) -> None:
        slot = slots.get()
        try:
            one(cell, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on child processes
        list(pool.map(with_slot, todo))
    return failures, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study YAML (launch/configs/study_*.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the study's 'out')")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel runs (default: number of GPUs, else number of CPU cores)")
    parser.add_argument("--threads-per-job", type=int, default=None,
                        help="torch threads per run (default: max(1, cores // jobs))")
    parser.add_argument("--only", nargs="+", default=[], metavar="FIELD=V1,V2",
                        help="restrict the grid, e.g. --only student=sasrec variant=none,dllm2rec seed=0")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="extra",
                        help="extra dotted overrides for every run (e.g. train.epochs=2)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs (and which are cached) and stop")
    parser.add_argument("--table-only", action="store_true", help="train nothing; rebuild the table from finished runs")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="delete and retrain cached runs whose config differs from the study's")


def run(args: argparse.Namespace) -> int:
    from dllm2rec.studies.study_table import write_outputs

    study = load_study(args.study, args.out)
    grid = cells(study, parse_only(args.only), args.extra)
    for cell in grid:
        resolve(study, cell)  # every cell's config is valid before anything trains
    jobs, n_gpu = default_jobs()
    jobs = args.jobs or jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
    cached = {c.label for c in grid if (c.run_dir / "results.json").is_file()}
    stale = {c.label: stale_keys(study, c) for c in grid if c.label in cached}
    stale = {k: v for k, v in stale.items() if v}
    todo = [c for c in grid if c.label not in cached or (args.rerun_stale and c.label in stale)]
    for label, keys in stale.items():
        print(f"warning: {label}: cached run differs from the study in {', '.join(keys)}"
              f"{' (retraining)' if args.rerun_stale else ' (kept; --rerun-stale retrains it)'}", file=sys.stderr)
    if args.dry_run:
        for c in grid:
            state = "cached" if c not in todo else "train"
            print(f"{state:6}  {c.label:40}  {c.run_dir}  {' '.join(c.overrides)}")
        print(f"{len(grid)} runs: {len(todo)} to train, {len(grid) - len(todo)} cached; jobs={jobs}, "
              f"threads/job={threads}, gpus={n_gpu}")
        return 0
    failures: dict[str, str] = {}
    if todo and not args.table_only:
        print(f"{study.name}: training {len(todo)} of {len(grid)} runs ({len(grid) - len(todo)} cached), "
              f"jobs={jobs}, threads/job={threads}, gpus={n_gpu}", file=sys.stderr)
        failures, skipped = run_cells(study, todo, jobs, threads, n_gpu, args.rerun_stale)
        busy = [label for label, why in skipped.items() if "held by" in why]
        if busy:
            print(f"note: {len(busy)} run(s) are being trained by another worker ({', '.join(busy)}); "
                  "rerun (or --table-only) after it finishes to include them in the table", file=sys.stderr)
    # The table covers the whole study (every cached run), not only the cells --only selected.
    table = write_outputs(study, cells(study, None, args.extra), failures, stale)
    print(table["markdown"])
    for label, err in failures.items():
        print(f"error: {label}: {err}", file=sys.stderr)
    return 1 if failures else 0
