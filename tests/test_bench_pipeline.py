"""bench pipeline pieces: size parsing, the stage runner (time, peak RSS, kill), the memory-mapped
column reader, the random-vector teacher stage (a folder the real loader accepts)."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pytest

from dllm2rec.bench.pipeline import parse_count, parse_counts, run_stage


def test_parse_counts():
    assert parse_counts("1M,5M,20M") == [10 ** 6, 5 * 10 ** 6, 20 * 10 ** 6]
    assert parse_counts("100k, 1m,2500,1.5k") == [100000, 10 ** 6, 2500, 1500]
    for bad in ("x", "0", "1.5", "-3k"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_count(bad)


def test_run_stage_measures_own_peak_and_kills_on_limits(tmp_path):
    env = dict(os.environ)
    grow = [sys.executable, "-c", "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"]
    r = run_stage(grow, tmp_path / "a.log", env, timeout=60, max_rss=8 << 30)
    assert r["status"] == "ok" and 0.29 < r["peak_rss_gb"] < 0.6  # its own 300 MB, not this process's size
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    r = run_stage(slow, tmp_path / "b.log", env, timeout=1.0, max_rss=8 << 30)
    assert r["status"] == "timeout" and r["seconds"] < 10
    r = run_stage(grow, tmp_path / "c.log", env, timeout=60, max_rss=100 << 20)
    assert r["status"] == "rss limit"
    r = run_stage([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "d.log", env, timeout=60, max_rss=8 << 30)
    assert r["status"] == "exit 3"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from dllm2rec.cli import main
    from dllm2rec.bench.synthlog import write_log

    root = tmp_path_factory.mktemp("pipe")
    write_log(root / "log", 6000, 400, seed=2)
    assert main(["data", "prepare", "--source", "recbole", "--input", str(root / "log"), "--out", str(root / "ds")]) == 0
    return root


def test_split_columns_equals_load_dataset(small):
    from dllm2rec.data.dataset import load_dataset, split_columns
    from dllm2rec.errors import ManifestError

    ds = load_dataset(small / "ds")
    for split in ("train", "valid", "test"):
        cols = split_columns(small / "ds", split, ["row_id", "target", "history_len", "timestamp"])
        for k, v in cols.items():
            assert v.dtype == np.int64 and np.array_equal(v, ds.splits[split][k]), (split, k)
    with pytest.raises(ManifestError, match="user"):
        split_columns(small / "ds", "train", ["user"])


def test_random_teacher_folder_loads_and_grounds_near_targets(small):
    from dllm2rec.bench.pipeline_stages import random_teacher
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.data.knowledge import load_teacher

    random_teacher(small / "ds", small / "teacher", dim=16, top_n=10, noise=0.3)
    ds = load_dataset(small / "ds")
    t = load_teacher(small / "teacher", ds)
    assert t.topk_ids.shape == (len(ds.splits["train"]["target"]), 10) and t.embeddings.shape == (ds.n_items, 16)
    assert (np.diff(t.topk_dist, axis=1) >= 0).all()
    # small noise: the target is the nearest item for most rows (the grounding is real, not random ids)
    assert (t.topk_ids[:, 0] == ds.splits["train"]["target"]).mean() > 0.8
    info = random_teacher(small / "ds", small / "teacher_ivf", dim=16, top_n=10, noise=0.3, index="ivf")
    t = load_teacher(small / "teacher_ivf", ds)
    assert info["index"] == "ivf" and (t.topk_ids[:, 0] == ds.splits["train"]["target"]).mean() > 0.7


def test_train_config_per_optimizer(tmp_path):
    from dllm2rec.bench.pipeline import train_config
    from dllm2rec.config import load_config

    args = argparse.Namespace(num_sampled=32)
    plain = load_config(train_config(tmp_path, tmp_path / "ds", tmp_path / "t", args))
    lazy = load_config(train_config(tmp_path, tmp_path / "ds", tmp_path / "t", args, "lazy_adam"))
    assert plain.train.optimizer == "adam" and plain.train.output_dir == str(tmp_path / "run")
    assert lazy.train.optimizer == "lazy_adam" and lazy.train.output_dir == str(tmp_path / "run_lazy_adam")
    assert (tmp_path / "train.yaml").is_file() and (tmp_path / "train_lazy_adam.yaml").is_file()


@pytest.mark.slow
def test_pipeline_runs_both_optimizers_side_by_side(tmp_path):
    import json

    from dllm2rec.cli import main

    out = tmp_path / "bench.md"
    assert main(["bench", "pipeline", "--interactions", "4k", "--items", "300", "--num-sampled", "32",
                 "--optimizer", "adam,lazy_adam", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    stages = [r["stage"] for r in rows]
    assert stages == ["generate", "prepare", "teacher", "train [adam]", "train [lazy_adam]",
                      "evaluate [adam]", "evaluate [lazy_adam]"]
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["valid_ndcg20"] is not None for r in rows if r["stage"].startswith("train"))
