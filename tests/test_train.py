"""End-to-end student training through the CLI function on a tiny synthetic dataset."""
from __future__ import annotations

import json

import pytest
import torch

from dllm2rec.cli import main
from dllm2rec.config import load_config
from dllm2rec.data.dataset import load_dataset
from dllm2rec.errors import TrainingError
from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)  # the test machine is shared: OpenMP spinning on 2 threads is 10x slower
    root = tmp_path_factory.mktemp("train")
    ds = synthetic_dataset(root / "ds", n_items=40, n_train=256, n_valid=64, n_test=64)
    teacher = synthetic_teacher(root / "teacher", load_dataset(ds), top_n=12, emb_dim=8)
    (root / "run.yaml").write_text(
        f"data: {{path: {ds}}}\nmodel: {{name: sasrec}}\n"
        f"distill: {{teacher: {teacher}, rd: {{enabled: true}}, ed: {{enabled: true}}}}\n"
        "loss: {dro_alpha: 0.1}\ntrain: {epochs: 2, batch_size: 64, progress: false}\n")
    return root


def _train(folders, out, *extra):
    return main(["train", "--config", str(folders / "run.yaml"), f"train.output_dir={out}", *extra])


def test_two_epochs_write_every_artefact(folders, tmp_path):
    out = tmp_path / "run"
    assert _train(folders, out) == 0
    for name in ("config.yaml", "metrics.jsonl", "results.json", "best/model.safetensors",
                 "checkpoints/last/manifest.json", "checkpoints/last/model.safetensors", "manifest.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert {"bce", "dro", "rd", "loss"} <= set(lines[0]["losses"])
    assert abs(lines[0]["losses"]["loss"] - sum(lines[0]["losses"][k] for k in ("bce", "dro", "rd"))) < 1e-4
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"].startswith("standard")
    assert res["best_epoch"] in (0, 1) and 0.0 <= res["test"]["ndcg@20"] <= 1.0
    best = lines[res["best_epoch"]]
    assert res["valid"] == best["valid"] and res["test"] == best["test"]
    assert load_config(out / "config.yaml").distill.rd.enabled  # resolved config reloads


def test_reference_protocol_is_labelled(folders, tmp_path):
    out = tmp_path / "ref"
    assert _train(folders, out, "train.epochs=1", "train.select_on=test", "train.eval_dropout=true",
                  "distill.rd.enabled=false", "distill.ed.enabled=false", "model.name=gru4rec") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "reference-protocol (selected on test, dropout on at eval)"


@pytest.mark.parametrize("extra", [["loss.objective=ce", "model.name=caser"],
                                   ["loss.objective=sampled_softmax", "loss.num_sampled=8", "distill.rd.enabled=false"],
                                   ["distill.rd.variant=paper", "loss.dro_alpha=0"]])
def test_other_objectives_train(folders, tmp_path, extra):
    out = tmp_path / "o"
    assert _train(folders, out, "train.epochs=1", *extra) == 0
    losses = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["losses"]
    assert all(v == v and abs(v) < 1e6 for v in losses.values())


def test_nan_loss_stops_and_keeps_last_checkpoint(folders, tmp_path, monkeypatch, capsys):
    import dllm2rec.losses.base as losses

    out = tmp_path / "nan"
    real, calls = losses.bce_loss, {"n": 0}

    def poisoned(pos, neg):
        calls["n"] += 1
        value = real(pos, neg)
        return value * float("nan") if calls["n"] > 6 else value  # epoch 0 = 4 steps, NaN in epoch 1

    monkeypatch.setattr(losses, "bce_loss", poisoned)
    assert _train(folders, out) == 2  # the CLI turns the TrainingError into one line + status 2
    assert "non-finite loss at epoch 1 step 2 (bce=nan" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="last good checkpoint is kept"):
        from dllm2rec.train.loop import train
        calls["n"] = 0
        train(load_config(folders / "run.yaml", [f"train.output_dir={tmp_path / 'nan2'}"]))
    state = json.loads((out / "checkpoints/last/state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 0  # the end-of-epoch-0 checkpoint survives


def test_cli_reports_bad_teacher_clearly(folders, tmp_path, capsys):
    rc = _train(folders, tmp_path / "x", f"distill.teacher={tmp_path / 'missing'}")
    assert rc == 2 and "teacher folder not found" in capsys.readouterr().err


def test_resume_mid_run_matches_uninterrupted(folders, tmp_path):
    """In-process: stop after epoch 1 (epochs=1), resume to epoch 2: same result as 2 epochs at once."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(folders, full, "train.checkpoint_every_steps=2") == 0
    assert _train(folders, part, "train.epochs=1") == 0
    assert _train(folders, part, "--resume", "--allow-change", "train.epochs") == 0  # epochs 1 -> 2
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(b) == 2
    for x, y in zip(a, b):
        assert x["losses"] == pytest.approx(y["losses"], rel=1e-5)
        assert x["valid"] == pytest.approx(y["valid"], rel=1e-5)


def test_evaluate_command_reproduces_best_test_metrics(folders, tmp_path):
    out = tmp_path / "ev"
    assert _train(folders, out, "train.epochs=2") == 0
    assert main(["evaluate", "--run", str(out), "--split", "test", "--out", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert got == pytest.approx(json.loads((out / "results.json").read_text())["test"], rel=1e-6)
