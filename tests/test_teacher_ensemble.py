"""``teacher from-run --run A --run B``: an ensemble of runs as one teacher (teacher/ensemble.py)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

try:
    import tiny_run
except ImportError:  # tests/ imported as a package
    from tests import tiny_run

from dllm2rec.data.dataset import load_dataset
from dllm2rec.data.knowledge import load_teacher
from dllm2rec.errors import ConfigError
from dllm2rec.serve.recommend import pad_histories
from dllm2rec.serve.student import load_student
from teacher.cli import run as teacher_cli
from teacher.ensemble import ensemble_from_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    a = tiny_run.make_run(tmp_path_factory.mktemp("ens_a"), "gru4rec", ed=False, steps=30)
    b = tiny_run.make_run(tmp_path_factory.mktemp("ens_b"), "sasrec", ed=False, steps=30)
    return a, b


def _probs(run, cols, dataset):
    """Float64[R, N]: the member's own softmax, computed here independently of the module."""
    s = load_student(run, dataset)
    s.model.eval()
    hists = [h[:n].tolist() for h, n in zip(cols["history"], cols["history_len"])]
    hist, lengths = pad_histories(hists, s.max_len, s.padding_id)
    with torch.no_grad():
        logits = s.encode(hist, lengths) @ s.output_weight.T + s.output_bias
    return torch.softmax(logits.double(), 1).numpy()


def test_ensemble_is_the_mean_of_member_probabilities(runs, tmp_path):
    a, b = runs
    data = load_student(a).config.data.path
    out = tmp_path / "ens"
    assert teacher_cli(["from-run", "--run", str(a), "--run", str(b), "--out", str(out),
                        "--top-n", "8", "--dataset", str(data)]) == 0
    ds = load_dataset(data)
    man = json.loads((out / "manifest.json").read_text())
    assert man["score_kind"] == "logprob"
    for split in ("train", "valid", "test"):
        cols = ds.splits[split]
        p = (_probs(a, cols, data) + _probs(b, cols, data)) / 2
        t = pq.read_table(out / f"rank_{split}.parquet").to_pydict()
        pos = {r: i for i, r in enumerate(t["row_id"])}
        got = np.array([t["topk_scores"][pos[int(r)]] for r in cols["row_id"]])
        ids = np.array([t["topk_ids"][pos[int(r)]] for r in cols["row_id"]])
        # the stored log-probabilities are the mean probabilities of the stored items
        np.testing.assert_allclose(np.exp(got), np.take_along_axis(p, ids, 1), rtol=1e-4, atol=1e-6)
        # and they are the 8 most probable items, best first
        np.testing.assert_allclose(np.exp(got), -np.sort(-p, 1)[:, :8], rtol=1e-4, atol=1e-6)
        target = np.asarray(cols["target"])
        pt = p[np.arange(len(target)), target]
        rank = np.array([t["target_rank"][pos[int(r)]] for r in cols["row_id"]])
        exact = (p > pt[:, None] * (1 + 1e-5)).sum(1) + 1
        loose = (p > pt[:, None] * (1 - 1e-5)).sum(1) + 1  # float32 ties may fall either way
        assert ((rank >= exact) & (rank <= loose)).all()
    tk = load_teacher(out, ds)
    assert tk.embeddings.shape == (ds.n_items, 32)  # two hidden-16 item tables side by side
    # a logprob teacher's confidence input: d_k = log p_1 - log p_k >= 0, 0 at the top
    assert (tk.topk_dist[:, 0] == 0).all() and (tk.topk_dist >= 0).all()


def test_ensemble_of_one_run_twice_ranks_like_the_run(runs, tmp_path):
    a, _ = runs
    single, twice = tmp_path / "one", tmp_path / "twice"
    assert teacher_cli(["from-run", "--run", str(a), "--out", str(single), "--top-n", "5"]) == 0
    ensemble_from_runs([a, a], twice, top_n=5)
    for split in ("valid", "test"):
        s = pq.read_table(single / f"rank_{split}.parquet").to_pydict()
        e = pq.read_table(twice / f"rank_{split}.parquet").to_pydict()
        assert s["row_id"] == e["row_id"] and s["target_rank"] == e["target_rank"]
        # the same confidence input: logit gaps == log-prob gaps for one softmax
        np.testing.assert_allclose(np.array(s["topk_dist"]), np.array(e["topk_dist"]), atol=1e-4)


def test_members_on_another_dataset_are_refused(runs, tmp_path):
    import shutil

    a, _ = runs
    moved = tmp_path / "moved_run"
    shutil.copytree(a, moved)
    # the run's manifest says it was trained on another catalogue than the one it is pointed at
    (moved / "manifest.json").write_text(json.dumps({"dataset_id_map_hash": "0" * 64}))
    with pytest.raises(ConfigError, match="another catalogue"):
        ensemble_from_runs([a, moved], tmp_path / "bad", top_n=5)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="at least two"):
        ensemble_from_runs([a], tmp_path / "bad", top_n=5)
