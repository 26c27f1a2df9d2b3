"""Reference-code format: import (real Games split), pickle trust, export round trip, tocf files."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dllm2rec.atomic import write_manifest
from dllm2rec.cli import main
from dllm2rec.data.dataset import DOMAINS, load_dataset
from dllm2rec.data.reference import (export_reference, export_teacher_tocf, import_reference, read_tocf,
                                     write_tocf)
from dllm2rec.errors import DataError

GAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dllm2rec-games"


@pytest.mark.skipif(not (GAMES / "val_data.csv").exists(), reason="shared Games data not present")
def test_import_real_games_split_and_export_round_trip(tmp_path):
    out = tmp_path / "games"
    assert main(["data", "import-reference", "--input", str(GAMES), "--out", str(out)]) == 0
    ds = load_dataset(out)
    assert ds.manifest["counts"] == {"train": 0, "valid": 14980, "test": 14980}
    assert ds.n_items == 17408 and ds.padding_id == 17408
    assert ds.manifest["train_source"] == "absent" and ds.manifest["protocol"]["timestamps"] is False
    assert ds.titles[0] == "Xbox 360 Guitar Hero 5 Guitar Bundle"  # published with a leading space
    assert ds.titles[17407] == "NBA Jam: Tournament Edition"
    assert ds.manifest["domain"] == DOMAINS["games"]
    first = ds.splits["valid"]
    assert first["history"][0].tolist() == [12898, 291, 14148, 14148, 11138, 4878, 10689, 5166, 10518, 8218]
    assert first["target"][0] == 4881
    exported = tmp_path / "export"
    export_reference(ds, exported)
    for name in ("val_data.csv", "test_data.csv"):
        assert (exported / name).read_bytes() == (GAMES / name).read_bytes()


def _ref_folder(tmp_path, n_items=5, L=3, train=True, name="ref"):
    d = tmp_path / name
    d.mkdir()
    (d / "id2name.txt").write_text("\n".join(f"Item {i}\t{i}" for i in range(n_items)))
    rows = "seq,len_seq,next\n" + f'"[0, 1, {n_items}]",2,3.0\n' + '"[2, 3, 4]",3,1.0\n'
    (d / "val_data.csv").write_text(rows)
    (d / "test_data.csv").write_text(rows)
    if train:
        # index labels deliberately out of order: rows must come back sorted by label
        pd.DataFrame({"seq": [[1, 2, 0], [4, n_items, n_items], [0, 1, 2]], "len_seq": [3, 1, 3],
                      "next": [3, 0, 4]}, index=[2, 0, 1]).to_pickle(d / "train_data.df")
        pd.DataFrame({"seq_size": [L], "item_num": [n_items]}).to_pickle(d / "data_statis.df")
    return d


class _Sentinel:
    """Unpickling this creates a file: proves whether a pickle was loaded."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickles_are_refused_without_trust(tmp_path, capsys):
    d = _ref_folder(tmp_path)
    marker = tmp_path / "was_unpickled"
    (d / "data_statis.df").write_bytes(pickle.dumps(_Sentinel(str(marker))))
    rc = main(["data", "import-reference", "--input", str(d), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "train_data.df" in err and "--trust-pickle" in err
    assert not (tmp_path / "o").exists()
    # --skip-train imports valid/test; data_statis is inferred, never unpickled
    assert main(["data", "import-reference", "--input", str(d), "--out", str(tmp_path / "o"), "--skip-train"]) == 0
    assert not marker.exists()
    ds = load_dataset(tmp_path / "o")
    assert ds.manifest["counts"]["train"] == 0 and ds.manifest["protocol"]["data_statis"] == "inferred"
    assert ds.manifest["train_source"] == "skipped"


def test_empty_valid_csv_gives_empty_split(tmp_path):
    d = _ref_folder(tmp_path, train=False)
    (d / "val_data.csv").write_text("seq,len_seq,next\n")
    m = import_reference(d, tmp_path / "o", name="x", domain=DOMAINS["games"])
    assert m["counts"] == {"train": 0, "valid": 0, "test": 2}
    assert load_dataset(tmp_path / "o").splits["valid"]["history"].shape == (0, 3)


def test_trusted_pickles_are_read_in_index_label_order(tmp_path):
    d = _ref_folder(tmp_path)
    with pytest.warns(UserWarning, match="unpickling"):
        m = import_reference(d, tmp_path / "o", name="ref", domain=DOMAINS["toys"], trust_pickle=True)
    assert m["counts"] == {"train": 3, "valid": 2, "test": 2} and m["train_source"] == "train_data.df"
    tr = load_dataset(tmp_path / "o").splits["train"]
    assert tr["row_id"].tolist() == [0, 1, 2]
    assert tr["target"].tolist() == [0, 4, 3]  # labels 0, 1, 2
    assert tr["history"][0].tolist() == [4, 5, 5] and tr["history_len"].tolist() == [1, 3, 3]


def test_export_with_pickle_reimports_identically(tmp_path):
    d = _ref_folder(tmp_path)
    with pytest.warns(UserWarning):
        import_reference(d, tmp_path / "a", name="ref", domain=DOMAINS["toys"], trust_pickle=True)
    ds = load_dataset(tmp_path / "a")
    assert main(["data", "export-reference", "--dataset", str(tmp_path / "a"), "--out", str(tmp_path / "exp"), "--pickle"]) == 0
    statis = pd.read_pickle(tmp_path / "exp" / "data_statis.df")
    assert int(statis["seq_size"][0]) == 3 and int(statis["item_num"][0]) == 5
    with pytest.warns(UserWarning):
        import_reference(tmp_path / "exp", tmp_path / "b", name="ref", domain=DOMAINS["toys"], trust_pickle=True)
    again = load_dataset(tmp_path / "b")
    assert again.titles == ds.titles
    for s in ("train", "valid", "test"):
        for k in ("history", "history_len", "target", "row_id"):
            assert np.array_equal(again.splits[s][k], ds.splits[s][k])


@pytest.mark.parametrize("fname,content,row,problem", [
    ("val_data.csv", 'seq,len_seq,next\n"[0, 1, 5]",2,3.0\n"[0, 1",2,3.0\n', 3, "seq is not a list"),
    ("val_data.csv", 'seq,len_seq,next\n"[0, 1, 5]",4,3.0\n', 2, "len_seq 4 outside"),
    ("val_data.csv", 'seq,len_seq,next\n"[0, 1, 5]",2,9.0\n', 2, "next 9 outside"),
    ("val_data.csv", 'seq,len_seq,next\n"[0, 1, 2]",2,3.0\n', 2, "padding"),
    ("test_data.csv", 'seq,len_seq,next\n"[0, 1, 5, 5]",2,3.0\n', 2, "expected 3"),
    ("test_data.csv", 'seq,next\n"[0, 1, 5]",3.0\n', 1, "missing column"),
    ("id2name.txt", "Item 0\t0\nItem 1\t0\n", 2, "duplicate item id"),
    ("id2name.txt", "Item 0\t0\n \t1\n", 2, "empty title"),
])
def test_bad_reference_files(tmp_path, fname, content, row, problem):
    d = _ref_folder(tmp_path, train=False)
    (d / fname).write_text(content)
    with pytest.raises(DataError, match=problem) as exc:
        import_reference(d, tmp_path / "o", name="x", domain=DOMAINS["games"])
    assert exc.value.row == row and exc.value.file.endswith(fname)
    assert not (tmp_path / "o").exists()


def _tocf_arrays(R=4, N=6, k=3, d=5):
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(N)[:k] for _ in range(R)])
    dist = np.sort(rng.random((R, k)).astype(np.float32) * 3, axis=1)
    return rng.standard_normal((N, d)).astype(np.float32), ids, dist


def test_tocf_round_trip(tmp_path):
    import torch

    emb, ids, dist = _tocf_arrays()
    write_tocf(tmp_path / "tocf", emb, ids, dist, id_map_hash_="h")
    got_ids, got_dist, got_emb = read_tocf(tmp_path / "tocf", 4, n_items=6, expected_id_map_hash="h")
    assert isinstance(got_emb, torch.Tensor) and got_emb.shape == (6, 5)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_dist, dist)
    assert np.array_equal(got_emb.numpy(), emb)


@pytest.mark.parametrize("breakage,problem", [
    ("rows", "training rows"), ("id_range", "item id outside"), ("order", "not ascending"),
    ("nan", "NaN"), ("n_items", "item embeddings"), ("not_tensor", "plain tensor"), ("hash", "id_map_hash"),
    ("ragged", "values, expected"),
])
def test_tocf_validation(tmp_path, breakage, problem):
    import torch

    emb, ids, dist = _tocf_arrays()
    folder = tmp_path / "tocf"
    write_tocf(folder, emb, ids, dist, id_map_hash_="h")
    kw = {"n_train_rows": 4, "n_items": 6, "expected_id_map_hash": "h"}
    if breakage == "rows":
        kw["n_train_rows"] = 5
    elif breakage == "id_range":
        ids[2, 1] = 6
        (folder / "myrank_train.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in ids))
    elif breakage == "order":
        (folder / "confidence_train.txt").write_text("".join(" ".join(map(str, r[::-1])) + "\n" for r in dist))
    elif breakage == "nan":
        (folder / "confidence_train.txt").write_text("nan 1 2\n" * 4)
    elif breakage == "n_items":
        kw["n_items"] = 7
    elif breakage == "not_tensor":
        torch.save({"emb": _Sentinel(str(tmp_path / "x"))}, folder / "all_embeddings.pt")
    elif breakage == "hash":
        kw["expected_id_map_hash"] = "other"
    elif breakage == "ragged":
        (folder / "myrank_train.txt").write_text("1 2 3\n1 2\n1 2 3\n1 2 3\n")
    with pytest.raises(DataError, match=problem):
        read_tocf(folder, **kw)
    assert not (tmp_path / "x").exists()


def test_export_teacher_folder_as_tocf(tmp_path):
    """A teacher folder per the ARCHITECTURE contract (dllm2rec.teacher/1) converts to tocf files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    d = _ref_folder(tmp_path)
    with pytest.warns(UserWarning):
        import_reference(d, tmp_path / "ds", name="ref", domain=DOMAINS["toys"], trust_pickle=True)
    ds = load_dataset(tmp_path / "ds")
    emb, ids, dist = _tocf_arrays(R=3, N=5, k=2, d=4)
    t = tmp_path / "teacher"
    t.mkdir()
    save_file({"embeddings": emb}, str(t / "item_embeddings.safetensors"))
    order = [2, 0, 1]  # rows stored out of order: export must sort by row_id
    pq.write_table(pa.table({"row_id": pa.array(order, pa.int64()),
                             "topk_ids": pa.array([ids[i].tolist() for i in order], pa.list_(pa.int32())),
                             "topk_dist": pa.array([dist[i].tolist() for i in order], pa.list_(pa.float32()))}),
                   t / "rank_train.parquet")
    write_manifest(t, {"schema": "dllm2rec.teacher/1", "id_map_hash": ds.id_map_hash, "n_items": 5})
    assert main(["data", "export-reference", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "data" / "ref"),
                 "--teacher", str(t)]) == 0
    got_ids, got_dist, got_emb = read_tocf(tmp_path / "tocf" / "ref", 3, n_items=5, expected_id_map_hash=ds.id_map_hash)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_dist, dist)
    assert json.loads((tmp_path / "tocf" / "ref" / "manifest.json").read_text())["top_n"] == 2


@pytest.mark.skipif(not (GAMES / "val_data.csv").exists(), reason="shared Games data not present")
def test_trained_student_evaluates_on_real_games_split(tmp_path):
    """The published Games split has no training file: fit a SASRec briefly on its validation rows
    and evaluate it with full ranking over all 17,408 items on its 14,980 test rows."""
    import torch

    from dllm2rec.eval import metrics
    from dllm2rec.losses import base as losses
    from dllm2rec.config import ModelConfig
    from dllm2rec.models import build_student

    out = tmp_path / "games"
    assert main(["data", "import-reference", "--input", str(GAMES), "--out", str(out)]) == 0
    ds = load_dataset(out)
    torch.manual_seed(0)
    model = build_student(ModelConfig(name="sasrec"), ds.n_items)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tr = {k: torch.as_tensor(v) for k, v in ds.splits["valid"].items() if k != "user"}
    gen = torch.Generator().manual_seed(0)
    for step in range(60):
        idx = torch.randint(0, len(tr["target"]), (256,), generator=gen)
        hist, lens, tgt = tr["history"][idx], tr["history_len"][idx], tr["target"][idx]
        h = model.encode(hist, lens, None)
        neg = losses.sample_negatives(hist, tgt, ds.n_items, generator=gen)
        w, b = model.output.weight, model.output.bias
        loss = losses.bce_loss((h * w[tgt]).sum(-1) + b[tgt], (h * w[neg]).sum(-1) + b[neg])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    te = ds.splits["test"]
    with torch.no_grad():
        ranks = torch.cat([
            metrics.rank_of_targets(model.encode(torch.as_tensor(te["history"][s:s + 2048]),
                                                 torch.as_tensor(te["history_len"][s:s + 2048]), None),
                                    model.output.weight, model.output.bias, torch.as_tensor(te["target"][s:s + 2048]))
            for s in range(0, len(te["target"]), 2048)])
    assert ranks.shape == (14980,) and int(ranks.min()) >= 1 and int(ranks.max()) <= 17408
    m = metrics.hr_ndcg(ranks, ks=(20, 50))
    assert 0.0 <= m["ndcg@50"] <= m["hr@50"] <= 1.0
    # 60 steps already learn popularity: far above a random ranking (HR@50 = 50 / 17408 = 0.0029)
    assert m["hr@50"] > 5 * 50 / 17408, m
