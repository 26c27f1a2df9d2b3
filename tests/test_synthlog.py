"""Synthetic interaction logs for the pipeline benchmark: determinism, skew, readable by prepare."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from dllm2rec.bench.synthlog import user_lengths, write_log


def _digest(folder) -> str:
    return hashlib.sha256((folder / "synthetic.inter").read_bytes() + (folder / "synthetic.item").read_bytes()).hexdigest()


def _log(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "synthetic.inter", sep="\t", header=0, names=["user", "item", "rating", "ts"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_log(tmp_path / "a", 30000, 2000, seed=3)
    write_log(tmp_path / "b", 30000, 2000, seed=3)
    write_log(tmp_path / "c", 30000, 2000, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    log = _log(tmp_path / "a")
    assert len(log) == 30000 == a["interactions"]  # exact count, last user cut
    assert log["user"].nunique() == a["users"]
    assert log["item"].between(0, 1999).all()


def test_item_popularity_is_zipf_and_users_long_tailed(tmp_path):
    write_log(tmp_path / "z", 200000, 10000, seed=0, item_exponent=1.0)
    log = _log(tmp_path / "z")
    counts = np.sort(log["item"].value_counts().to_numpy())[::-1]
    # Zipf(1) over 10k items: the top 1% of items hold ~ H(100)/H(10000) = 53% of interactions;
    # uniform popularity would give 1%.
    top1 = counts[:100].sum() / counts.sum()
    assert 0.45 < top1 < 0.60
    # log-log slope of count vs rank over ranks 10..1000 is about -1
    r = np.arange(10, 1000)
    slope = np.polyfit(np.log(r + 1), np.log(counts[r]), 1)[0]
    assert -1.2 < slope < -0.8
    # users: heavy tail (the most active 10% of users hold far more than 10% of interactions)
    per_user = np.sort(log.groupby("user").size().to_numpy())[::-1]
    assert per_user[: len(per_user) // 10].sum() / per_user.sum() > 0.3
    assert per_user.max() > 10 * np.median(per_user)
    # timestamps increase within a user (file order = time order per user)
    assert (log.groupby("user")["ts"].diff().dropna() > 0).all()


def test_user_lengths_sum_exactly_and_reject_bad_sizes():
    rng = np.random.default_rng(0)
    lens = user_lengths(12345, 20.0, 1.0, rng)
    assert lens.sum() == 12345 and (lens[:-1] >= 2).all() and lens[-1] >= 1
    with pytest.raises(ValueError, match="interactions"):
        user_lengths(1, 20.0, 1.0, rng)


def test_prepare_reads_the_log(tmp_path):
    from dllm2rec.cli import main
    from dllm2rec.data.dataset import load_dataset

    write_log(tmp_path / "log", 5000, 300, seed=1)
    assert main(["data", "prepare", "--source", "recbole", "--input", str(tmp_path / "log"),
                 "--out", str(tmp_path / "ds")]) == 0
    ds = load_dataset(tmp_path / "ds")
    assert ds.manifest["stats"]["interactions_kept"] == 5000
    assert ds.n_items <= 300 and sum(ds.manifest["counts"].values()) > 0
