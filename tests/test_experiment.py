"""The study runner: grid -> cached runs -> one table (mean ± std, gain, teacher metrics, PNG)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from dllm2rec.atomic import write_manifest
from dllm2rec.cli import main
from dllm2rec.errors import ConfigError
from dllm2rec.studies.experiment import cells, load_study, parse_only, resolve
from dllm2rec.studies.plots import is_png

REPO = Path(__file__).resolve().parents[1]
TEACHER_TEST = {"hr@20": 0.3125, "ndcg@20": 0.1234}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher

    root = tmp_path_factory.mktemp("study")
    ds_dir = synthetic_dataset(root / "ds", n_items=30, n_train=192, n_valid=48, n_test=48)
    ds = load_dataset(ds_dir)
    teacher = synthetic_teacher(root / "teacher", ds, top_n=20, emb_dim=8)
    manifest = json.loads((teacher / "manifest.json").read_text())
    manifest["metrics"] = {"test": TEACHER_TEST}  # what `teacher merge` records
    write_manifest(teacher, manifest)
    return root, ds_dir, teacher


def _study(root: Path, ds_dir, teacher, out: str = "out", **changes) -> Path:
    raw = yaml.safe_load((REPO / "launch/configs/study_tiny.yaml").read_text())
    raw.update(dataset=str(ds_dir), teacher=str(teacher), out=str(root / out), **changes)
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_results(out: Path, student: str, variant: str) -> list[dict]:
    return [json.loads((out / student / variant / f"seed{s}" / "results.json").read_text())["test"] for s in (0, 1)]


def test_study_table_and_cache(folders, capsys):
    root, ds_dir, teacher = folders
    study = _study(root, ds_dir, teacher)
    out = root / "out"
    assert main(["experiment", "--study", str(study), "--jobs", "1", "--threads-per-job", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {(r["student"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {(s, v) for s in ("gru4rec", "sasrec") for v in ("none", "dllm2rec")}
    for (student, variant), r in rows.items():
        per_seed = _run_results(out, student, variant)
        assert r["n"] == 2 and r["seeds"] == [0, 1]
        for m in ("hr@20", "ndcg@20"):
            vals = [t[m] for t in per_seed]
            assert r[f"{m}_mean"] == pytest.approx(statistics.fmean(vals))
            assert r[f"{m}_std"] == pytest.approx(statistics.stdev(vals))
        # the selection metric is reported next to the test metrics
        valid = [json.loads((out / student / variant / f"seed{s}" / "results.json").read_text())["valid"]["ndcg@20"]
                 for s in (0, 1)]
        assert r["valid_ndcg@20_mean"] == pytest.approx(statistics.fmean(valid))
        assert r["protocols"] == ["standard (selected on valid, dropout off at eval)"]
    for student in ("gru4rec", "sasrec"):
        base, dist = rows[(student, "none")], rows[(student, "dllm2rec")]
        assert base["ndcg@20_gain_pct"] is None
        assert dist["ndcg@20_gain_pct"] == pytest.approx(
            100 * (dist["ndcg@20_mean"] - base["ndcg@20_mean"]) / base["ndcg@20_mean"])
        # its spread: the per-seed gains against the same seed's plain run
        paired = [100 * (d - b) / b for d, b in zip(dist["ndcg@20_values"], base["ndcg@20_values"])]
        assert base["ndcg@20_gain_std"] is None
        assert dist["ndcg@20_gain_std"] == pytest.approx(statistics.stdev(paired))
    # the distilled runs really used the teacher (ED adds the projection weights)
    cfg = yaml.safe_load((out / "gru4rec/dllm2rec/seed0/config.yaml").read_text())
    assert cfg["distill"]["rd"]["enabled"] and cfg["distill"]["ed"]["enabled"] and cfg["train"]["seed"] == 0
    assert res["teacher"]["hr@20"] == TEACHER_TEST["hr@20"]
    md = (out / "results.md").read_text()
    assert "| gru4rec | dllm2rec | 2 |" in md and "± " in md and "Teacher on test: HR@20 0.3125" in md
    assert is_png(out / "results.png") and (out / "results.png").stat().st_size < 200_000

    # rerun: everything cached, no run folder is touched
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*/results.json")}
    assert len(stamps) == 8
    capsys.readouterr()
    assert main(["experiment", "--study", str(study), "--jobs", "1"]) == 0
    assert "training" not in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a changed config marks cached runs stale (and says which key)
    assert main(["experiment", "--study", str(study), "--set", "train.lr=0.01", "--dry-run",
                 "--only", "student=sasrec", "variant=none", "seed=0"]) == 0
    err = capsys.readouterr().err
    assert "sasrec/none/seed0" in err and "train.lr" in err


def test_failed_run_is_reported_and_others_finish(folders, capsys):
    root, ds_dir, _ = folders
    study = _study(root, ds_dir, root / "no-such-teacher", out="broken")
    rc = main(["experiment", "--study", str(study), "--jobs", "1", "--only", "student=gru4rec", "seed=0"])
    assert rc == 1
    assert (root / "broken/gru4rec/none/seed0/results.json").is_file()
    assert not (root / "broken/gru4rec/dllm2rec/seed0/results.json").exists()
    md = (root / "broken/results.md").read_text()
    assert "FAILED gru4rec/dllm2rec/seed0" in md and "no-such-teacher" in md
    assert "Teacher test metrics: not available" in md
    assert "No finished run yet (3 of 4)" in md  # the table covers the whole study, not only --only


@pytest.mark.slow  # two child processes each import torch + accelerate: ~50 s on a loaded 2-core box
def test_child_process_jobs(folders):
    root, ds_dir, teacher = folders
    study = _study(root, ds_dir, teacher, out="parallel")
    assert main(["experiment", "--study", str(study), "--jobs", "2", "--threads-per-job", "1",
                 "--only", "student=gru4rec", "variant=none"]) == 0
    for s in (0, 1):
        run = root / "parallel/gru4rec/none" / f"seed{s}"
        assert (run / "results.json").is_file() and (run / "train.log").is_file()
    res = json.loads((root / "parallel/results.json").read_text())
    assert [(r["student"], r["variant"], r["n"]) for r in res["rows"] if r["n"]] == [("gru4rec", "none", 2)]


def test_dry_run_lists_without_training(folders, capsys):
    root, ds_dir, teacher = folders
    study = _study(root, ds_dir, teacher, out="dry")
    assert main(["experiment", "--study", str(study), "--dry-run", "--only", "variant=dllm2rec"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train")]
    assert len(lines) == 4 and all("distill.rd.enabled=true" in ln for ln in lines)
    assert not (root / "dry").exists()


def test_shipped_ml100k_study_resolves():
    study = load_study(REPO / "launch/configs/study_ml100k.yaml")
    grid = cells(study)
    assert len(grid) == 3 * 10 * 3
    by = {(c.student, c.variant, c.seed): resolve(study, c) for c in grid}
    picked = by[("sasrec", "ed_only_w0.5", 1)]  # the variant the validation sweep picked
    assert not picked.distill.rd.enabled and picked.distill.ed.enabled and picked.distill.ed.weight == 0.5
    dros = by[("dros", "none", 0)]
    assert dros.model.name == "sasrec" and dros.loss.dro_alpha == 1.0
    assert by[("sasrec", "none", 0)].loss.dro_alpha == 0.0
    assert not by[("gru4rec", "none", 1)].distill.rd.enabled and by[("gru4rec", "none", 1)].train.seed == 1
    assert by[("sasrec", "ed_no_offset", 2)].distill.ed.learnable_offset is False
    assert by[("sasrec", "paper_variant", 0)].distill.rd.variant == "paper"
    assert by[("gru4rec", "no_consistency", 0)].distill.rd.use_consistency is False
    assert by[("gru4rec", "rd_only", 0)].distill.rd.enabled and not by[("gru4rec", "rd_only", 0)].distill.ed.enabled
    assert str(by[("dros", "dllm2rec", 2)].train.output_dir).endswith("runs/study/ml100k/dros/dllm2rec/seed2")
    only = cells(study, parse_only(["student=sasrec", "variant=none,dllm2rec"]))
    assert {(c.student, c.variant) for c in only} == {("sasrec", "none"), ("sasrec", "dllm2rec")} and len(only) == 6


def test_shipped_softmax_and_sweep_studies_resolve():
    ce = load_study(REPO / "launch/configs/study_ml100k_ce.yaml")
    by = {(c.student, c.variant, c.seed): resolve(ce, c) for c in cells(ce)}
    assert len(by) == 2 * 2 * 3 and all(r.loss.objective == "ce" for r in by.values())
    assert by[("gru4rec", "dllm2rec", 2)].distill.rd.enabled and by[("gru4rec", "dllm2rec", 2)].model.name == "gru4rec"
    sweep = load_study(REPO / "launch/configs/study_ml100k_sweep.yaml")
    sw = {c.variant: resolve(sweep, c) for c in cells(sweep)}
    assert sw["lam0.05_ed0.2"].distill.rd.lam == 0.05 and sw["lam0.8_ed0.05"].distill.ed.weight == 0.05
    assert sw["lam0.0_ed0.5"].distill.rd.enabled is False and sw["none"].distill.ed.enabled is False
    mix = load_study(REPO / "launch/configs/study_ml100k_ce_sweep.yaml")
    assert {c.variant: resolve(mix, c) for c in cells(mix)}["mix0.1_ed0.2"].distill.rd.soft_target_mix == 0.1


def test_bad_study_and_filters(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset": "d", "teacher": "t", "out": "o", "students": ["sasrec"],
                                   "variants": ["none", "distill_everything"]}))
    with pytest.raises(ConfigError, match="distill_everything"):
        load_study(bad)
    bad.write_text(yaml.safe_dump({"dataset": "d", "teacher": "t", "out": "o", "students": ["sasrec"],
                                   "variants": ["none"], "epochs": 3}))
    with pytest.raises(ConfigError, match="epochs"):
        load_study(bad)
    study = load_study(REPO / "launch/configs/study_tiny.yaml")
    with pytest.raises(ConfigError, match="caser"):
        cells(study, parse_only(["student=caser"]))
    with pytest.raises(ConfigError, match="--only"):
        parse_only(["model=sasrec"])
