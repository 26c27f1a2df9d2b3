"""A RecBole model as a distillation teacher: id mapping, top-n rows, import, end to end (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

try:
    from test_recbole_compare import make_dataset
except ImportError:  # tests/ imported as a package
    from tests.test_recbole_compare import make_dataset

from dllm2rec.compare.recbole import recbole_python
from dllm2rec.compare.recbole_runner import item_maps, ranking_lines, top_n_rows
from dllm2rec.compare.recbole_teacher import check_teacher_args, teacher_ready
from dllm2rec.data.knowledge import load_teacher
from dllm2rec.errors import ConfigError, DataError
from teacher.importer import import_rankings

REPO = Path(__file__).resolve().parents[1]
N = 12


def test_item_maps_invert_recbole_tokens_and_reorder_the_table():
    # RecBole numbers items in first-seen order; entry 0 is its [PAD]
    id2token = np.array(["[PAD]", "3", "0", "2", "1"])
    ours_of_internal, internal_of_ours = item_maps(id2token, 4)
    assert ours_of_internal.tolist() == [-1, 3, 0, 2, 1]
    assert internal_of_ours.tolist() == [2, 4, 3, 1]
    weight = np.arange(5)[:, None] * np.ones((1, 3))  # row i = internal id i
    table = weight[internal_of_ours]
    for j in range(4):  # our item j gets the row of the token str(j); PAD row dropped
        assert table[j, 0] == list(id2token).index(str(j))
    for bad in (["[PAD]", "0", "1", "1", "3"], ["[PAD]", "0", "1", "x", "3"], ["[PAD]", "0", "1", "2"]):
        with pytest.raises(ValueError, match="tokens"):
            item_maps(np.array(bad), 4)


def test_top_n_rows_skip_pad_map_ids_and_rank_ties_in_the_targets_favour():
    ours_of_internal = np.array([-1, 2, 0, 1, 3])
    scores = torch.tensor([[9.0, 1.0, 3.0, 2.0, 0.5],    # PAD scored highest: must never be listed
                           [0.0, 4.0, 4.0, 1.0, 7.0]])   # tie 4.0 = 4.0 with the target
    ids, vals, gt, rank = top_n_rows(scores, torch.tensor([3, 2]), 3, ours_of_internal)
    assert ids.tolist() == [[0, 1, 2], [3, 2, 0]] or ids.tolist() == [[0, 1, 2], [3, 0, 2]]
    assert vals.tolist() == [[3.0, 2.0, 1.0], [7.0, 4.0, 4.0]]
    assert gt.tolist() == [2.0, 4.0]
    assert rank.tolist() == [2, 2]  # 1 + #strictly higher (row 2: only 7.0)


def _fake_rankings(ds, top_n, seed=0):
    """Lines as the runner writes them, from random full-sort scores with a shuffled token order."""
    rng = np.random.default_rng(seed)
    id2token = np.array(["[PAD]"] + [str(t) for t in rng.permutation(N)])
    ours_of_internal, internal_of_ours = item_maps(id2token, N)
    lines, truth = [], {}
    for split in ("train", "valid", "test"):
        c = ds.splits[split]
        scores = torch.from_numpy(rng.normal(size=(len(c["row_id"]), N + 1)).astype(np.float32))
        ours_scores = scores[:, 1:].numpy()[:, np.argsort(ours_of_internal[1:])]  # column j = our item j
        target = torch.from_numpy(internal_of_ours[c["target"]])
        fields = top_n_rows(scores, target, top_n, ours_of_internal)
        lines += ranking_lines(c["row_id"], *fields)
        for r, s, t in zip(c["row_id"], ours_scores, c["target"]):
            truth[int(r)] = (s, int(t))
    return lines, truth


def test_runner_lines_import_as_an_exact_teacher_folder(tmp_path):
    ds = make_dataset(tmp_path / "tiny", n_items=N, rows=(40, 8, 9))
    lines, truth = _fake_rankings(ds, top_n=10)
    f = tmp_path / "teacher_rankings.jsonl"
    f.write_text("".join(lines))
    emb = tmp_path / "item_embeddings.npy"
    np.save(emb, np.random.default_rng(1).normal(size=(N, 5)).astype(np.float32))
    man = import_rankings(f, "logit", ds.path, tmp_path / "T", emb, min_top_n=10, source={"recbole_model": "X"})
    assert man["metrics_from"] == "target_rank" and man["source"]["recbole_model"] == "X"
    assert man["splits"] == {"train": 40, "valid": 8, "test": 9} and man["score_kind"] == "logit"
    for split in ("train", "valid", "test"):
        t = pq.read_table(tmp_path / "T" / f"rank_{split}.parquet").to_pydict()
        for rid, ids, sc, rank in zip(t["row_id"], t["topk_ids"], t["topk_scores"], t["target_rank"]):
            s, tgt = truth[rid]
            assert ids == np.argsort(-s, kind="stable")[:10].tolist()  # our ids, best first
            assert sc == s[ids].tolist()  # float32 scores survive the text round trip exactly
            assert rank == 1 + int((s > s[tgt]).sum())
    tk = load_teacher(tmp_path / "T", ds)
    np.testing.assert_array_equal(tk.embeddings, np.load(emb))


@pytest.mark.parametrize("value,needle", [(0, "outside 1..12"), (13, "outside 1..12"),
                                          ("worse", "worse than the target's place"),
                                          (None, "some rows but not all"), (2.5, "must be an integer")])
def test_import_refuses_bad_target_rank(tmp_path, value, needle):
    ds = make_dataset(tmp_path / "tiny", n_items=N, rows=(40, 8, 9))
    recs = [json.loads(x) for x in _fake_rankings(ds, top_n=10)[0]]
    r = next(i for i, rec in enumerate(recs) if i >= 3 and rec["target_rank"] <= 5)  # target listed
    recs[r]["target_rank"] = recs[r]["target_rank"] + 6 if value == "worse" else value
    if value is None:
        del recs[r]["target_rank"]
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in recs))
    emb = tmp_path / "e.npy"
    np.save(emb, np.zeros((N, 2), np.float32))
    with pytest.raises(DataError, match=needle) as err:
        import_rankings(f, "logit", ds.path, tmp_path / "T", emb)
    assert err.value.row == r and str(f) in str(err.value)
    assert not (tmp_path / "T").exists()


def test_teacher_options_and_reuse(tmp_path):
    assert check_teacher_args(None, None, 4, 100) is None
    assert check_teacher_args(None, "T", 1, 100) == 50 and check_teacher_args(None, "T", 1, 30) == 30
    assert check_teacher_args(20, None, 6, 100) == 20  # files for every run, no import
    with pytest.raises(ConfigError, match="one --models and one --seeds"):
        check_teacher_args(20, "T", 2, 100)
    with pytest.raises(ConfigError, match="must be in 10..100"):
        check_teacher_args(5, None, 1, 100)
    (tmp_path / "teacher_rankings.jsonl").write_text("")
    assert not teacher_ready({"teacher": {"top_n": 20}}, tmp_path, 20)  # no item table yet
    (tmp_path / "item_embeddings.npy").write_bytes(b"")
    assert teacher_ready({"teacher": {"top_n": 20}}, tmp_path, 20)
    assert not teacher_ready({"teacher": {"top_n": 20}}, tmp_path, 30)
    assert not teacher_ready({"teacher": None}, tmp_path, 20) and teacher_ready({}, tmp_path, None)


def test_recbole_command_refuses_teacher_out_for_several_runs_before_any_work(tmp_path):
    import argparse

    from dllm2rec.compare.recbole import add_arguments, run

    ds = make_dataset(tmp_path / "tiny", n_items=N, rows=(40, 8, 9))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--dataset", str(ds.path), "--models", "GRU4Rec", "--seeds", "0", "1",
                         "--out", str(tmp_path / "rb"), "--teacher-out", str(tmp_path / "T"),
                         "--recbole-python", sys.executable])
    with pytest.raises(ConfigError, match="2 \\(model, seed\\) runs"):
        run(args)
    assert not (tmp_path / "rb").exists() and not (tmp_path / "T").exists()


@pytest.mark.slow
def test_recbole_gru4rec_as_teacher_end_to_end(tmp_path):
    """Real RecBole GRU4Rec, 1 epoch; its teacher folder agrees with the ranks RecBole reports."""
    try:
        recbole_python()
    except ConfigError as exc:
        pytest.skip(f"optional RecBole venv absent ({exc}); build it with bash launch/recbole_env.sh")
    ds = make_dataset(tmp_path / "tiny", n_items=30, rows=(300, 40, 50), seed=1)
    out, teacher = tmp_path / "rb", tmp_path / "T"
    cmd = [sys.executable, "-m", "dllm2rec", "recbole", "--dataset", str(ds.path), "--models", "GRU4Rec",
           "--seeds", "0", "--epochs", "1", "--out", str(out), "--teacher-top-n", "10",
           "--teacher-out", str(teacher)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "runs" / "GRU4Rec-seed0"
    man = json.loads((teacher / "manifest.json").read_text())
    assert man["splits"] == {"train": 300, "valid": 40, "test": 50} and man["top_n"] == 10
    assert man["score_kind"] == "logit" and man["source"]["recbole_model"] == "GRU4Rec"
    test_rank = dict(map(tuple, np.load(run / "test_ranks.npy").tolist()))
    t = pq.read_table(teacher / "rank_test.parquet").to_pydict()
    target = dict(zip(ds.splits["test"]["row_id"].tolist(), ds.splits["test"]["target"].tolist()))
    listed = 0
    for rid, ids, rank in zip(t["row_id"], t["topk_ids"], t["target_rank"]):
        assert rank == test_rank[rid]  # the exact rank equals RecBole's own evaluation
        if target[rid] in ids:  # and the listed place agrees where the target is in the top-n
            listed += 1
            assert ids.index(target[rid]) + 1 == test_rank[rid]
    assert listed > 0
    res = json.loads((run / "result.json").read_text())
    assert man["metrics"]["test"]["hr@10"] == pytest.approx(res["recbole"]["test"]["hit@10"], abs=2e-6)
    assert man["metrics"]["test"]["ndcg@20"] == pytest.approx(res["recbole"]["test"]["ndcg@20"], abs=2e-6)
    v = pq.read_table(teacher / "rank_valid.parquet").to_pydict()
    vt = dict(zip(ds.splits["valid"]["row_id"].tolist(), ds.splits["valid"]["target"].tolist()))
    for rid, ids, rank in zip(v["row_id"], v["topk_ids"], v["target_rank"]):
        if vt[rid] in ids:
            assert ids.index(vt[rid]) + 1 == rank
    emb = np.load(run / "item_embeddings.npy")
    assert emb.shape == (30, 64)
    np.testing.assert_array_equal(load_teacher(teacher, ds).embeddings, emb)
    # a second call reuses the run (teacher files present) and re-imports the folder
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0 and "reusing" in again.stderr, again.stderr[-2000:]
