"""Validation-safe distillation strength: ``python -m dllm2rec tune --study S``.

``python -m dllm2rec tune --study launch/configs/study_ml100k_control.yaml [--trials 8]
[--seeds 0 1 2] [--only student=gru4rec] [--variant dllm2rec] [--jobs 2] [--threads-per-job 1]
[--set loss.objective=ce] [--out DIR]``

For each student of the study, an Optuna study (TPE, seed 0) picks the distillation strength of
the study's ``--variant`` (default ``dllm2rec``) on VALIDATION only:

- BCE / DRO students: ``distill.rd.lam`` in LAM, ``distill.ed.weight`` in ED_WEIGHT;
- CE students: ``distill.rd.soft_target_mix`` in MIX (lam is unused by the CE form), ED weight.

Every space contains 0, and 0 switches the part off (``rd.enabled=false`` / ``ed.enabled=false``),
so the all-zero point IS the plain student (variant ``none``). It is enqueued as trial 0 and
always evaluated first; the recommendation is the trial with the best mean validation
``ndcg@K`` over the seeds (ties: the earliest trial, so zero wins ties), hence it is never worse
on validation than no distillation. Test metrics of each trial are recorded but never used to
choose; report the chosen trial's test once.

A point whose config equals a finished run of the study itself (e.g. the zero point = the
``none`` run) reuses that run instead of training it again. Resumable: trials live in ``<out>/tune/optuna.db`` (SQLite, one Optuna study per student);
a trial's runs live in ``<out>/tune/<student>/<params>/seed<k>/`` and are cached by their
parameters (a repeated point, or a rerun after a crash, reuses finished runs). ``--trials N``
runs trials until the student's study has N finished ones. Outputs ``<out>/tune/tune.json`` and
``tune.md`` (per student: the zero point and the chosen point, valid and test, every trial).

``--confirm-seeds 1 2``: after the choice, train the chosen point and the zero point on these
further seeds too (reusing finished runs the same way) and report both over all seeds (the tuning
seeds and the confirmation seeds) with the test gain of the chosen point over zero (ratio of the
means, ± the std of the per-seed paired gains, as in the study tables).
The confirmation seeds never influence the choice, so their numbers are an unselected check.
"""
from __future__ import annotations

import argparse
import json
import statistics

from dllm2rec.atomic import atomic_write_json, atomic_write_text
from dllm2rec.errors import ConfigError
from dllm2rec.studies.experiment import Cell, cells, load_study, parse_only, resolve, run_cells

LAM = [0.0, 0.1, 0.2, 0.4, 0.8]
ED_WEIGHT = [0.0, 0.05, 0.1, 0.2, 0.5]
MIX = [0.0, 0.1, 0.25, 0.5]


def space(objective: str) -> dict[str, list[float]]:
    """The search space (override key -> choices, each containing 0) for a loss objective."""
    strength = ("distill.rd.soft_target_mix", MIX) if objective == "ce" else ("distill.rd.lam", LAM)
    return {strength[0]: strength[1], "distill.ed.weight": ED_WEIGHT}


def point_overrides(params: dict[str, float]) -> list[str]:
    """Dotted overrides of a point; a zero strength switches its part off (exactly the plain student)."""
    # a zero value is not written: the part is off, so the config equals the plain student's exactly
    ov = [f"{k}={v}" for k, v in sorted(params.items()) if v > 0]
    rd = next(v for k, v in params.items() if k.startswith("distill.rd."))
    ov.append(f"distill.rd.enabled={'true' if rd > 0 else 'false'}")
    ov.append(f"distill.ed.enabled={'true' if params['distill.ed.weight'] > 0 else 'false'}")
    return ov


def point_name(params: dict[str, float]) -> str:
    """Folder name of a point, e.g. ``ed_weight0.2_rd_lam0.1``."""
    return "_".join(f"{k.split('.', 1)[1].replace('.', '_')}{v:g}" for k, v in sorted(params.items()))


def trial_cells(study, student: str, variant: str, seeds: list[int], params: dict, extra: list[str]) -> list[Cell]:
    """The runs of one point: the study's cells for (student, variant), moved under tune/."""
    base = cells(study, {"student": {student}, "variant": {variant}}, extra)
    out = []
    for c in base:
        if c.seed not in seeds:
            continue
        run_dir = study.out / "tune" / student / point_name(params) / f"seed{c.seed}"
        ov = [o for o in c.overrides if not o.startswith("train.output_dir=")]
        out.append(Cell(student, point_name(params), c.seed, run_dir, ov + point_overrides(params)
                        + [f"train.output_dir={run_dir}"]))
    return out


def _same_run(study, a: Cell, b: Cell) -> bool:
    ra, rb = resolve(study, a), resolve(study, b)
    ra.train.output_dir = rb.train.output_dir
    return ra == rb


def reuse_study_runs(study, todo: list[Cell], extra: list[str]) -> list[Cell]:
    """Point each cell at a finished study run with exactly the same config, when there is one
    (the zero point is the study's ``none`` run, the paper point its ``dllm2rec`` run)."""
    out = []
    for cell in todo:
        same = [c for c in cells(study, {"student": {cell.student}, "seed": {str(cell.seed)}}, extra)
                if (c.run_dir / "results.json").is_file() and _same_run(study, c, cell)]
        out.append(Cell(cell.student, cell.variant, cell.seed, same[0].run_dir, cell.overrides) if same else cell)
    return out


def _results(cell_list: list[Cell], metric: str) -> dict:
    vals, tests = [], []
    for c in cell_list:
        res = json.loads((c.run_dir / "results.json").read_text(encoding="utf-8"))
        vals.append(float(res["valid"][metric]))
        tests.append(float(res["test"][metric]))
    return {"valid": statistics.fmean(vals), "test": statistics.fmean(tests), "valid_values": vals, "test_values": tests}


def tune_student(study, student: str, variant: str, seeds: list[int], trials: int, jobs: int, threads: int,
                 extra: list[str]) -> dict:
    """Run the Optuna study of one student until it has ``trials`` finished trials -> summary."""
    import optuna

    metric = f"ndcg@{study.k}"
    probe = trial_cells(study, student, variant, seeds, {"distill.rd.lam": 0.0, "distill.ed.weight": 0.0}, extra)
    if not probe:
        raise ConfigError(f"{study.path}: no runs for student {student!r} with seeds {seeds} (study seeds {study.seeds})")
    sp = space(resolve(study, probe[0]).loss.objective)
    root = study.out / "tune"
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opt = optuna.create_study(study_name=f"{study.name}/{student}/{variant}/seeds{'-'.join(map(str, seeds))}",
                              storage=f"sqlite:///{root / 'optuna.db'}", direction="maximize",
                              sampler=optuna.samplers.TPESampler(seed=0), load_if_exists=True)
    if not opt.trials:
        opt.enqueue_trial({k: 0.0 for k in sp})  # the plain student, evaluated first

    def objective(trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in sp.items()}
        # RuntimeError (a failed run, or a cell another worker still holds): the trial is retried later
        todo = _train_point(study, student, variant, seeds, params, extra, jobs, threads)
        res = _results(todo, metric)
        trial.set_user_attr("test", res["test"])
        trial.set_user_attr("runs", [str(c.run_dir) for c in todo])
        return res["valid"]

    done = [t for t in opt.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < trials:
        opt.optimize(objective, n_trials=trials - len(done), catch=(RuntimeError,))
    done = [t for t in opt.trials if t.state == optuna.trial.TrialState.COMPLETE]
    zero = [t for t in done if all(v == 0 for v in t.params.values())]
    if not zero:
        raise RuntimeError(f"{student}: the all-zero point did not finish; see {root}")
    best = sorted(done, key=lambda t: (-t.value, t.number))[0]
    row = lambda t: {"trial": t.number, "params": t.params, "valid": t.value, "test": t.user_attrs.get("test")}
    return {"student": student, "variant": variant, "metric": metric, "seeds": seeds, "zero": row(zero[0]),
            "chosen": row(best), "trials": [row(t) for t in done]}


def _train_point(study, student, variant, seeds, params, extra, jobs, threads) -> list[Cell]:
    """Finished runs of one point on ``seeds`` (reusing study and tune runs); RuntimeError if any failed."""
    todo = reuse_study_runs(study, trial_cells(study, student, variant, seeds, params, extra), extra)
    failures, skipped = run_cells(study, [c for c in todo if not (c.run_dir / "results.json").is_file()],
                                  jobs, threads, 0)
    missing = [c.label for c in todo if not (c.run_dir / "results.json").is_file()]
    if failures or missing:
        raise RuntimeError(f"runs failed: {failures}; busy elsewhere: {skipped}; without results: {missing}")
    return todo


def confirm(study, summary: dict, seeds: list[int], jobs: int, threads: int, extra: list[str]) -> dict:
    """The chosen and the zero point over the tuning seeds plus ``seeds`` -> summary["confirm"].

    Per point: mean valid / test of the metric and the per-seed values (seed order = ``all_seeds``);
    ``gain_test``: mean test(chosen) / mean test(zero) - 1 (as in the study tables), ``gain_test_std`` the
    sample std of the per-seed gains test(chosen) / test(zero) - 1 (None for one seed)."""
    all_seeds = sorted(set(summary["seeds"]) | set(seeds))
    metric = summary["metric"]
    out = {"seeds": all_seeds, "confirm_seeds": sorted(set(seeds) - set(summary["seeds"]))}
    for name in ("chosen", "zero"):
        params = summary[name]["params"]
        runs = sorted(_train_point(study, summary["student"], summary["variant"], all_seeds, params, extra, jobs,
                                   threads), key=lambda c: c.seed)
        out[name] = {"params": params, **_results(runs, metric), "runs": [str(c.run_dir) for c in runs]}
    gains = [c / z - 1 for c, z in zip(out["chosen"]["test_values"], out["zero"]["test_values"])]
    out["gain_test"] = out["chosen"]["test"] / out["zero"]["test"] - 1
    out["gain_test_std"] = statistics.stdev(gains) if len(gains) > 1 else None
    return out


def confirm_table(summaries: list[dict]) -> str:
    rows = [s for s in summaries if s.get("confirm")]
    if not rows:
        return ""
    lines = ["", "Confirmation (the chosen point and the zero point over every seed; the confirmation seeds chose nothing):", "",
             "| student | seeds | chosen valid | chosen test | zero valid | zero test | paired test gain |",
             "|---|---|---|---|---|---|---|"]
    for s in rows:
        c = s["confirm"]
        std = "" if c["gain_test_std"] is None else f" ± {100 * c['gain_test_std']:.1f}"
        lines.append(f"| {s['student']} | {','.join(map(str, c['seeds']))} | {c['chosen']['valid']:.4f} | "
                     f"{c['chosen']['test']:.4f} | {c['zero']['valid']:.4f} | {c['zero']['test']:.4f} | "
                     f"{100 * c['gain_test']:+.1f}%{std} |")
    return "\n".join(lines) + "\n"


def table(summaries: list[dict]) -> str:
    lines = ["| student | chosen point (valid-selected) | valid | test | zero point valid | zero point test | trials |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        c, z = s["chosen"], s["zero"]
        pts = ", ".join(f"{k.split('.', 1)[1]}={v:g}" for k, v in sorted(c["params"].items()))
        lines.append(f"| {s['student']} | {pts} | {c['valid']:.4f} | {c['test']:.4f} | {z['valid']:.4f} | "
                     f"{z['test']:.4f} | {len(s['trials'])} |")
    metric = summaries[0]["metric"] if summaries else "ndcg@K"
    return ("\n".join(lines) + f"\n\n{metric}, mean over seeds; chosen on validation, test reported once.\n"
            + confirm_table(summaries))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study YAML (launch/configs/study_*.yaml)")
    parser.add_argument("--out", default=None, help="study output folder (default: the study's 'out')")
    parser.add_argument("--variant", default="dllm2rec", help="the study variant whose strength is tuned")
    parser.add_argument("--trials", type=int, default=8, help="finished trials per student (the zero point included)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per trial (default: the study's)")
    parser.add_argument("--only", nargs="+", default=[], metavar="student=A,B", help="restrict the students")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="extra",
                        help="extra dotted overrides for every run (e.g. loss.objective=ce)")
    parser.add_argument("--confirm-seeds", type=int, nargs="+", default=[], metavar="SEED",
                        help="after choosing, also train the chosen and the zero point on these seeds and report "
                             "both over all seeds with paired test gains (e.g. --seeds 0 --confirm-seeds 1 2)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs (the seeds of one trial)")
    parser.add_argument("--threads-per-job", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    study = load_study(args.study, args.out)
    if args.variant not in study.variants:
        raise ConfigError(f"--variant {args.variant!r} is not a variant of {study.path} ({sorted(study.variants)})")
    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    seeds = args.seeds or study.seeds
    only = parse_only(args.only)
    if set(only) - {"student"}:
        raise ConfigError("tune --only accepts student=... only")
    students = [s for s in study.students if s in only.get("student", set(study.students))]
    bad = sorted(set(args.confirm_seeds) - set(study.seeds))
    if bad:
        raise ConfigError(f"--confirm-seeds {bad} are not seeds of {study.path} ({study.seeds})")
    summaries = [tune_student(study, s, args.variant, seeds, args.trials, args.jobs, args.threads_per_job, args.extra)
                 for s in students]
    for s in summaries if args.confirm_seeds else []:
        s["confirm"] = confirm(study, s, args.confirm_seeds, args.jobs, args.threads_per_job, args.extra)
    root = study.out / "tune"
    previous = json.loads((root / "tune.json").read_text()) if (root / "tune.json").is_file() else {}
    old = previous.get("students", {})
    for s in summaries:  # a rerun without --confirm-seeds keeps the confirmation of the same choice
        kept = old.get(s["student"], {}).get("confirm")
        if "confirm" not in s and kept and kept["chosen"]["params"] == s["chosen"]["params"]:
            s["confirm"] = kept
    merged = {**old, **{s["student"]: s for s in summaries}}
    atomic_write_json(root / "tune.json", {"schema": "dllm2rec.tune/1", "study": study.path, "students": merged})
    md = table(list(merged.values()))
    atomic_write_text(root / "tune.md", md)
    print(md)
    return 0

