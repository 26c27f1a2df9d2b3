"""RecBole comparison: benchmark-file export, rank -> metric cross-check, end-to-end RecBole run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dllm2rec.errors import ConfigError, DataError
from dllm2rec.compare.recbole import check_ranks, metrics_from_ranks, recbole_python
from dllm2rec.compare.recbole_export import INTER_HEADER, export_recbole, read_export

REPO = Path(__file__).resolve().parents[1]
L = 4


def _split(rng, n_items, n_rows, start):
    hl = rng.integers(1, L + 1, n_rows)
    hist = np.full((n_rows, L), n_items, np.int64)
    for r, n in enumerate(hl):
        hist[r, :n] = rng.integers(0, n_items, n)
    return {"row_id": np.arange(start, start + n_rows, dtype=np.int64),
            "user": np.array([f"u{r % 7}" for r in range(n_rows)], dtype=object),
            "history": hist, "history_len": hl.astype(np.int64),
            "target": rng.integers(0, n_items, n_rows).astype(np.int64),
            "timestamp": np.arange(start, start + n_rows, dtype=np.int64)}


def make_dataset(folder: Path, n_items=12, rows=(40, 8, 9), seed=0):
    """A real dataset folder (save_dataset) with random rows; item n_items-1 may never occur."""
    from dllm2rec.data.dataset import DOMAINS, load_dataset, save_dataset

    rng = np.random.default_rng(seed)
    starts = np.cumsum((0,) + rows[:-1])
    splits = {s: _split(rng, n_items, n, int(st)) for s, n, st in zip(("train", "valid", "test"), rows, starts)}
    save_dataset(folder, name="tiny", titles=[f"Movie {i}" for i in range(n_items)], splits=splits,
                 max_history=L, protocol={"timestamps": True}, domain=DOMAINS["movies"], sources=[])
    return load_dataset(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "tiny")


def test_export_writes_one_line_per_row_with_unpadded_history(tiny, tmp_path):
    out = tmp_path / "atomic" / "dllm2rec-tiny"
    man = export_recbole(tiny, out)
    assert man["counts"] == tiny.manifest["counts"] and read_export(out)["n_items"] == 12
    for split in ("train", "valid", "test"):
        lines = (out / f"dllm2rec-tiny.{split}.inter").read_text().splitlines()
        assert lines[0] == INTER_HEADER == "session_id:token\titem_id_list:token_seq\titem_id:token"
        c = tiny.splits[split]
        assert len(lines) - 1 == len(c["target"])
        for r, line in enumerate(lines[1:]):
            sess, hist, tgt = line.split("\t")
            n = int(c["history_len"][r])
            assert int(sess) == c["row_id"][r]
            assert [int(x) for x in hist.split(" ")] == c["history"][r, :n].tolist()
            assert str(12) not in hist.split(" ")  # padding id never exported
            assert int(tgt) == c["target"][r]
    items = (out / "dllm2rec-tiny.item").read_text().splitlines()
    assert items == ["item_id:token"] + [str(i) for i in range(12)]


def test_export_refuses_out_of_range_item_and_leaves_no_folder(tiny, tmp_path):
    bad = tiny.splits["valid"]["history"].copy()
    bad[3, 0] = 99
    broken = type(tiny)(path=tiny.path, manifest=tiny.manifest, titles=tiny.titles,
                        splits={**tiny.splits, "valid": {**tiny.splits["valid"], "history": bad}})
    with pytest.raises(DataError, match=r"\[valid\].*row 3: item id outside 0..11"):
        export_recbole(broken, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_metrics_from_ranks_match_hand_computed_values():
    m = metrics_from_ranks(np.array([1, 3, 10, 11, 20, 21, 500]))
    assert m["hr@10"] == pytest.approx(3 / 7) and m["hr@20"] == pytest.approx(5 / 7)
    assert m["hr@1"] == m["ndcg@1"] == pytest.approx(1 / 7)
    ndcg10 = (1 + 1 / math.log2(4) + 1 / math.log2(11)) / 7
    assert m["ndcg@10"] == pytest.approx(ndcg10)
    assert m["ndcg@20"] == pytest.approx(ndcg10 + (1 / math.log2(12) + 1 / math.log2(21)) / 7)
    with pytest.raises(DataError):
        metrics_from_ranks(np.array([0, 2]))


def test_check_ranks_reorders_and_rejects_foreign_rows():
    rr = np.array([[7, 2], [5, 1], [6, 9]])
    assert check_ranks(rr, np.array([5, 6, 7]), 10, "t").tolist() == [1, 9, 2]
    with pytest.raises(DataError, match="not exactly the 3 test rows"):
        check_ranks(rr, np.array([5, 6, 8]), 10, "t")
    with pytest.raises(DataError, match="outside 1..5"):
        check_ranks(rr, np.array([5, 6, 7]), 5, "t")


def test_finish_run_refuses_rows_recbole_filtered(tiny, tmp_path):
    from dllm2rec.compare.recbole import finish_run

    raw = {"model": "SASRec", "seed": 0, "rows": {"train": 39, "valid": 8, "test": 9}, "test": {}}
    with pytest.raises(DataError, match="filtered or re-split"):
        finish_run(raw, tmp_path, tiny)
    assert not (tmp_path / "result.json").exists()


def test_missing_recbole_venv_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RECBOLE_PYTHON", raising=False)
    with pytest.raises(ConfigError, match="launch/recbole_env.sh"):
        recbole_python(str(tmp_path / "nope" / "python"))


def _venv_python():
    try:
        return recbole_python()
    except ConfigError as exc:
        pytest.skip(f"optional RecBole venv absent ({exc})")


@pytest.mark.slow
def test_recbole_end_to_end_on_tiny_dataset(tmp_path):
    """Real RecBole SASRec, 2 epochs, on a tiny split: every test row ranked over all N items."""
    _venv_python()
    # Item 29 occurs in no row: RecBole must still rank it (it comes from the .item file).
    ds = make_dataset(tmp_path / "tiny", n_items=30, rows=(300, 40, 50), seed=1)
    out = tmp_path / "rb"
    cmd = [sys.executable, "-m", "dllm2rec", "recbole", "--dataset", str(ds.path), "--models", "SASRec",
           "--seeds", "0", "--epochs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "runs" / "SASRec-seed0" / "result.json").read_text())
    assert res["recbole"]["n_items_ranked"] == 30
    assert res["recbole"]["rows"] == {"train": 300, "valid": 40, "test": 50}
    assert res["recbole"]["epochs_run"] == 2 and res["recbole"]["best_epoch"] in (0, 1)
    assert res["metrics_agree"], res["metrics_max_abs_diff"]
    assert {"hr@10", "hr@20", "ndcg@10", "ndcg@20", "hr@50"} <= set(res["test_ours"])
    assert "| SASRec | 0 |" in (out / "results.md").read_text()
    # a second call reuses the finished run instead of training again
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0 and "reusing" in again.stderr
