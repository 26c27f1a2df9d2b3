"""Bring-your-own teacher: ``teacher import`` (score kinds, bad files) and ``teacher from-run``."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

try:
    import tiny_run
except ImportError:  # tests/ imported as a package
    from tests import tiny_run

from dllm2rec.config import RDConfig
from dllm2rec.data.dataset import load_dataset
from dllm2rec.data.knowledge import load_teacher
from dllm2rec.errors import ConfigError, DataError
from dllm2rec.losses.distill import rd_weights
from dllm2rec.bench.synthetic import synthetic_dataset
from teacher.cli import run as teacher_cli
from teacher.importer import import_rankings

N, TOP = 30, 6


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset(synthetic_dataset(tmp_path_factory.mktemp("byot") / "ds", n_items=N, n_train=40,
                                          n_valid=6, n_test=6))


def _rows(ds, kind: str, seed: int = 0, splits=("train", "valid", "test")) -> list[dict]:
    """One record per row; scores best first for ``kind``; true item listed at a random place."""
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits:
        for rid, tgt in zip(ds.splits[split]["row_id"], ds.splits[split]["target"]):
            ids = [int(tgt)] + [int(i) for i in rng.permutation([i for i in range(N) if i != tgt])[:TOP - 1]]
            rng.shuffle(ids)
            s = np.sort(rng.normal(size=TOP))[::-1]
            if kind == "distance":
                s = np.sort(rng.random(TOP) * 3)
            elif kind == "logprob":
                s = s - np.log(np.exp(s).sum()) - 1.0
            rows.append({"row_id": int(rid), "topk_ids": ids, "topk_scores": [float(x) for x in s],
                         "gt_score": float(s[ids.index(int(tgt))])})
    return rows


def _write(path, rows, fmt="jsonl"):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _emb(tmp_path, n=N, d=4):
    p = tmp_path / "emb.npy"
    np.save(p, np.random.default_rng(0).normal(size=(n, d)).astype(np.float32))
    return p


@pytest.mark.parametrize("kind,fmt", [("distance", "jsonl"), ("similarity", "parquet"), ("logit", "jsonl"),
                                      ("logprob", "parquet")])
def test_each_score_kind_lands_where_documented(ds, tmp_path, kind, fmt):
    rows = _rows(ds, kind)
    f = _write(tmp_path / f"r.{fmt}", rows, fmt)
    out = tmp_path / "t"
    assert teacher_cli(["import", "--rankings", str(f), "--score-kind", kind, "--dataset", str(ds.path),
                        "--out", str(out), "--item-embeddings", str(_emb(tmp_path)), "--min-top-n", "5"]) == 0
    tk = load_teacher(out, ds)
    by_id = {r["row_id"]: r for r in rows}
    for i, rid in enumerate(ds.splits["train"]["row_id"]):
        s = np.array(by_id[int(rid)]["topk_scores"], np.float64)
        want = s if kind == "distance" else s[0] - s
        np.testing.assert_allclose(tk.topk_dist[i], want, rtol=1e-5, atol=1e-5)
        assert tk.topk_ids[i].tolist() == by_id[int(rid)]["topk_ids"]
        gt = by_id[int(rid)]["gt_score"]
        np.testing.assert_allclose(tk.gt_dist[i], gt if kind == "distance" else max(s[0] - gt, 0), atol=1e-5)
    # the official confidence weight is the teacher's own softmax over its K candidates
    cfg = RDConfig(enabled=True, use_position=False, use_consistency=False)
    w = rd_weights(torch.from_numpy(tk.topk_dist), None, None, cfg).numpy()
    s = np.array([by_id[int(r)]["topk_scores"] for r in ds.splits["train"]["row_id"]])
    want = np.exp(-s) if kind == "distance" else np.exp(s)
    np.testing.assert_allclose(w, want / want.sum(1, keepdims=True), rtol=1e-4)
    m = json.loads((out / "manifest.json").read_text())
    assert m["score_kind"] == kind and m["splits"] == {"train": 40, "valid": 6, "test": 6}
    # every true item is listed, so list-based HR@5 of a 6-long list is < 1 but HR over the list is 1
    assert 0 < m["metrics"]["test"]["hr@5"] <= 1


def _bad(rows, what):
    rows = [dict(r) for r in rows]
    if what == "unknown_row":
        rows[3]["row_id"] = 10_000
    elif what == "duplicate_row":
        rows[3]["row_id"] = rows[2]["row_id"]
    elif what == "id_out_of_range":
        rows[3]["topk_ids"] = [N] + rows[3]["topk_ids"][1:]
    elif what == "ragged":
        rows[3]["topk_ids"] = rows[3]["topk_ids"][:-1]
        rows[3]["topk_scores"] = rows[3]["topk_scores"][:-1]
    elif what == "nan":
        rows[3]["topk_scores"] = [float("nan")] + rows[3]["topk_scores"][1:]
    elif what == "unsorted":
        rows[3]["topk_scores"] = rows[3]["topk_scores"][::-1]
    return rows


@pytest.mark.parametrize("what,needle", [
    ("unknown_row", "is not a row of the dataset"), ("duplicate_row", "appears more than once"),
    ("id_out_of_range", "outside 0..29"), ("ragged", "ragged"), ("nan", "NaN or infinite"),
    ("unsorted", "not sorted descending"), ("too_short", "fewer than the required"),
    ("undeclared_kind", "not declared"), ("embedding_rows", "29 rows but the dataset has 30"),
])
def test_bad_files_give_named_errors_and_no_folder(ds, tmp_path, what, needle):
    rows = _rows(ds, "logit")
    f = _write(tmp_path / "r.jsonl", _bad(rows, what))
    emb = _emb(tmp_path, n=N - 1 if what == "embedding_rows" else N)
    kind = None if what == "undeclared_kind" else "logit"
    out = tmp_path / "t"
    with pytest.raises((DataError, ConfigError), match=needle) as err:
        import_rankings(f, kind, ds.path, out, emb, min_top_n=TOP + 1 if what == "too_short" else 5)
    if isinstance(err.value, DataError) and what not in ("too_short", "embedding_rows"):
        assert err.value.row == 3 and str(f) in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".t.*"))


def test_subset_of_training_rows_follows_min_coverage(ds, tmp_path):
    rows = [r for r in _rows(ds, "similarity", splits=("train",)) if r["row_id"] % 4]
    out = tmp_path / "t"
    import_rankings(_write(tmp_path / "r.jsonl", rows), "similarity", ds.path, out, _emb(tmp_path), 5)
    with pytest.raises(DataError, match="training rows"):
        load_teacher(out, ds)
    tk = load_teacher(out, ds, min_coverage=0.5)
    assert tk.covered.sum() == len(rows)


def test_from_run_round_trip_equals_recommend(tmp_path):
    from dllm2rec.serve.recommend import load_student, recommend

    torch.set_num_threads(1)
    run = tiny_run.make_run(tmp_path, "gru4rec", ed=False, steps=40)
    out = tmp_path / "teacher_from_run"
    assert teacher_cli(["from-run", "--run", str(run), "--out", str(out), "--top-n", "8"]) == 0
    student = load_student(run)
    ds = load_dataset(student.config.data.path)
    for split in ("train", "valid", "test"):
        cols = ds.splits[split]
        hists = [h[:n].tolist() for h, n in zip(cols["history"], cols["history_len"])]
        scores, ids = recommend(student, hists, 8)
        t = pq.read_table(out / f"rank_{split}.parquet").to_pydict()
        pos = {r: i for i, r in enumerate(t["row_id"])}
        got = np.array([t["topk_ids"][pos[int(r)]] for r in cols["row_id"]])
        np.testing.assert_array_equal(got, ids.numpy())
        got_s = np.array([t["topk_scores"][pos[int(r)]] for r in cols["row_id"]])
        np.testing.assert_allclose(got_s, scores.numpy(), rtol=1e-5, atol=1e-5)
        # target_rank 1 <=> the true item is the top-1 recommendation
        tr = np.array([t["target_rank"][pos[int(r)]] for r in cols["row_id"]])
        np.testing.assert_array_equal(tr == 1, ids.numpy()[:, 0] == cols["target"])
    tk = load_teacher(out, ds)
    emb = student.model.embed.item.weight[: ds.n_items].detach()
    torch.testing.assert_close(tk.embeddings.float(), emb)
    assert (tk.gt_dist >= 0).all() and json.loads((out / "manifest.json").read_text())["score_kind"] == "logit"
