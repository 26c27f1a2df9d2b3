"""``tune``: the zero point is the plain student, evaluated first; the choice never loses to it on
validation, even with a deliberately harmful teacher; Optuna storage resumes without retraining."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dllm2rec.cli import main
from dllm2rec.config import load_config
from dllm2rec.data.dataset import load_dataset
from dllm2rec.studies.experiment import cells, load_study
from dllm2rec.studies.tune import point_overrides, space
from dllm2rec.bench.synthetic import synthetic_dataset
from teacher.importer import import_rankings

pytest.importorskip("optuna")


def _harmful_teacher(root, ds, top_n=10):
    """Top-n lists that never hold the target (a shifted, wrong rule), confident logits, noise table."""
    n = ds.n_items
    rows = []
    for split in ("train", "valid", "test"):
        for rid, tgt in zip(ds.splits[split]["row_id"], ds.splits[split]["target"]):
            ids = [int((tgt + 7 + j) % n) for j in range(top_n)]
            rows.append({"row_id": int(rid), "topk_ids": ids, "topk_scores": [float(10 - j) for j in range(top_n)]})
    f = root / "harmful.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = root / "noise.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32))
    import_rankings(f, "logit", ds.path, root / "teacher", emb)
    return root / "teacher"


def _study(tmp_path, n_train: int, seeds: list[int], overrides: list[str]):
    """A one-student study (GRU4Rec, none / dllm2rec) over a synthetic split with the harmful teacher."""
    n_eval = n_train // 4
    ds = load_dataset(synthetic_dataset(tmp_path / "ds", n_items=30, n_train=n_train, n_valid=n_eval, n_test=n_eval))
    teacher = _harmful_teacher(tmp_path, ds)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "harm", "base": None, "dataset": str(ds.path), "teacher": str(teacher), "out": str(tmp_path / "out"),
        "seeds": seeds, "students": ["gru4rec"], "variants": ["none", "dllm2rec"],
        "overrides": overrides + ["train.patience=0", "distill.rd.k=10"]}))
    return study_file


def test_space_contains_zero_and_zero_is_off():
    for objective in ("bce", "ce"):
        assert all(0.0 in v for v in space(objective).values())
    assert "distill.rd.soft_target_mix" in space("ce") and "distill.rd.lam" in space("bce")
    ov = point_overrides({"distill.rd.lam": 0.0, "distill.ed.weight": 0.0})
    assert "distill.rd.enabled=false" in ov and "distill.ed.enabled=false" in ov


def test_tune_never_worse_than_zero_on_validation_and_resumes(tmp_path, capsys):
    study_file = _study(tmp_path, 128, [0], ["train.epochs=2", "train.batch_size=64", "model.hidden=16", "eval.ks=[10,20]"])
    # the study's plain run exists already: the zero point must reuse it, not train it again
    assert main(["experiment", "--study", str(study_file), "--only", "variant=none", "--jobs", "1"]) == 0
    none_run = tmp_path / "out/gru4rec/none/seed0"
    stamp = (none_run / "results.json").stat().st_mtime_ns
    argv = ["tune", "--study", str(study_file), "--trials", "3", "--threads-per-job", "1"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out/tune/tune.json").read_text())["students"]["gru4rec"]
    trials = sorted(res["trials"], key=lambda t: t["trial"])
    assert trials[0]["params"] == {"distill.rd.lam": 0.0, "distill.ed.weight": 0.0}  # zero first
    assert len(trials) == 3 and res["zero"]["trial"] == 0
    assert res["chosen"]["valid"] >= res["zero"]["valid"]
    assert res["chosen"]["valid"] == max(t["valid"] for t in trials)
    # the zero point IS the study's plain `none` student: same config, so its run was reused
    assert res["zero"]["valid"] == json.loads((none_run / "results.json").read_text())["valid"]["ndcg@20"]
    assert (none_run / "results.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "out/tune/gru4rec/ed_weight0_rd_lam0").exists()
    study = load_study(study_file)
    none = [c for c in cells(study) if c.variant == "none"][0]
    got = load_config(none_run / "config.yaml")
    assert not got.distill.rd.enabled and not got.distill.ed.enabled
    # resume: the same request trains nothing more and keeps the answer
    runs = sorted(p for p in (tmp_path / "out/tune/gru4rec").glob("*/seed0/results.json"))
    mtimes = [p.stat().st_mtime_ns for p in runs]
    assert main(argv) == 0
    again = json.loads((tmp_path / "out/tune/tune.json").read_text())["students"]["gru4rec"]
    assert again["chosen"] == res["chosen"] and len(again["trials"]) == 3
    assert [p.stat().st_mtime_ns for p in runs] == mtimes
    assert "chosen on validation" in capsys.readouterr().out


def test_confirm_seeds_report_both_points_over_every_seed(tmp_path, capsys):
    study_file = _study(tmp_path, 96, [0, 1], ["train.epochs=1", "train.batch_size=48", "model.hidden=8", "eval.ks=[20]"])
    base = ["tune", "--study", str(study_file), "--seeds", "0", "--trials", "2", "--threads-per-job", "1"]
    assert main(base + ["--confirm-seeds", "7"]) != 0  # refused by name before anything is trained
    assert "--confirm-seeds [7] are not seeds of" in capsys.readouterr().err
    assert not (tmp_path / "out/tune").exists()
    assert main(base + ["--confirm-seeds", "1"]) == 0
    res = json.loads((tmp_path / "out/tune/tune.json").read_text())["students"]["gru4rec"]
    conf = res["confirm"]
    assert conf["seeds"] == [0, 1] and conf["confirm_seeds"] == [1]
    # seed 0 of the confirmation is the tuning run itself; seed 1 was trained for the check
    assert conf["chosen"]["valid_values"][0] == res["chosen"]["valid"]
    assert conf["zero"]["valid_values"][0] == res["zero"]["valid"]
    for name in ("chosen", "zero"):
        for seed, run in zip(conf["seeds"], conf[name]["runs"]):
            assert run.endswith(f"seed{seed}")
            got = json.loads((Path(run) / "results.json").read_text())
            assert got["test"]["ndcg@20"] == conf[name]["test_values"][seed]
    c, z = conf["chosen"]["test_values"], conf["zero"]["test_values"]
    assert conf["gain_test"] == pytest.approx(sum(c) / sum(z) - 1)
    gains = [a / b - 1 for a, b in zip(c, z)]
    assert conf["gain_test_std"] == pytest.approx(abs(gains[0] - gains[1]) / 2 ** 0.5)
    assert "Confirmation" in capsys.readouterr().out
    # a rerun without --confirm-seeds trains nothing and keeps the confirmation of the same choice
    assert main(base) == 0
    again = json.loads((tmp_path / "out/tune/tune.json").read_text())["students"]["gru4rec"]
    assert again["confirm"] == conf
