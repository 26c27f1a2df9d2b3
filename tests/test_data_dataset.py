"""Dataset folders: byte-identical re-prepare, validation on load, refusal of incomplete folders."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dllm2rec.cli import main
from dllm2rec.data.dataset import DOMAINS, id_map_hash, load_dataset, save_dataset
from dllm2rec.errors import DataError, ManifestError


def _raw_folder(tmp_path, name="raw"):
    """A small ml-100k-format log: 6 users x 15 items with ties and one untitled item."""
    d = tmp_path / name
    d.mkdir()
    rng = np.random.default_rng(0)
    lines = [f"{u}\t{rng.integers(1, 31)}\t3\t{rng.integers(0, 40)}" for u in range(1, 7) for _ in range(15)]
    (d / "u.data").write_text("\n".join(lines) + "\n")
    (d / "u.item").write_text("".join(f"{i}|Movie {i} ({1980 + i})|x\n" for i in range(1, 30)) + "30|unknown|x\n")
    return d


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _prepare(raw, out):
    assert main(["data", "prepare", "--source", "ml-100k", "--input", str(raw), "--out", str(out),
                 "--name", "tiny", "--max-history", "5"]) == 0


def test_prepare_twice_is_byte_identical(tmp_path):
    raw = _raw_folder(tmp_path)
    other = shutil.copytree(raw, tmp_path / "elsewhere" / "raw")  # same bytes, other path
    _prepare(raw, tmp_path / "a")
    _prepare(other, tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and "splits/train/state.json" in a
    assert [k for k in a if a[k] != b[k]] == []


def test_load_returns_arrays_and_titles(tmp_path):
    _prepare(_raw_folder(tmp_path), tmp_path / "ds")
    ds = load_dataset(tmp_path / "ds")
    assert ds.n_items == ds.padding_id == ds.manifest["n_items"]
    assert "unknown" not in ds.titles  # placeholder title: item dropped
    tr = ds.splits["train"]
    assert tr["history"].dtype == np.int64 and tr["history"].shape == (len(tr["target"]), 5)
    total = sum(len(ds.splits[s]["target"]) for s in ("train", "valid", "test"))
    assert ds.manifest["counts"]["train"] == len(tr["target"]) == int(0.8 * total)
    assert ds.manifest["id_map_hash"] == id_map_hash(ds.titles)
    assert ds.manifest["domain"] == DOMAINS["movies"]
    assert {s["file"] for s in ds.manifest["sources"]} == {"u.data", "u.item"}


def test_incomplete_folder_is_refused(tmp_path):
    _prepare(_raw_folder(tmp_path), tmp_path / "ds")
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest"):
        load_dataset(tmp_path / "ds")


def test_tampered_titles_are_refused(tmp_path):
    _prepare(_raw_folder(tmp_path), tmp_path / "ds")
    p = tmp_path / "ds" / "items.parquet"
    t = pq.read_table(p)
    titles = t.column("title").to_pylist()
    titles[0] = "Another Movie"
    pq.write_table(t.set_column(1, "title", pa.array(titles)), p)
    with pytest.raises(ManifestError, match="id_map_hash"):
        load_dataset(tmp_path / "ds")


def test_count_mismatch_is_refused(tmp_path):
    _prepare(_raw_folder(tmp_path), tmp_path / "ds")
    mp = tmp_path / "ds" / "manifest.json"
    m = json.loads(mp.read_text())
    m["counts"]["test"] += 1
    mp.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="test"):
        load_dataset(tmp_path / "ds")


def _splits(hist, lens, tgts):
    hist, lens, tgts = np.array(hist), np.array(lens), np.array(tgts)
    R = len(tgts)
    one = {"row_id": np.arange(R), "user": np.array(["u"] * R, dtype=object), "history": hist,
           "history_len": lens, "target": tgts, "timestamp": np.zeros(R, np.int64)}
    empty = {k: v[:0] for k, v in one.items()}
    return {"train": one, "valid": {**empty}, "test": {**empty}}


@pytest.mark.parametrize("hist,lens,tgts,problem", [
    ([[0, 1, 3]], [2], [5], "target outside"),
    ([[0, 1, 3]], [0], [2], "history_len outside"),
    ([[0, 1, 0]], [2], [2], "padding after history_len"),
    ([[0, 7, 3]], [2], [2], "history id outside"),
])
def test_invalid_rows_are_refused_before_writing(tmp_path, hist, lens, tgts, problem):
    with pytest.raises(DataError, match=problem):
        save_dataset(tmp_path / "ds", name="x", titles=["a", "b", "c"], splits=_splits(hist, lens, tgts),
                     max_history=3, protocol={}, domain=DOMAINS["movies"], sources=[])
    assert not (tmp_path / "ds").exists()
