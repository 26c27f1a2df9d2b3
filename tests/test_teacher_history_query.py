"""Generation-free teacher (teacher/query.py): history-item queries, phases, manifest, loader."""
from __future__ import annotations

import numpy as np
import pytest

from dllm2rec.errors import ConfigError
from teacher.query import history_queries, history_weights
from tests.test_teacher_fast import teacher_cfg, tiny_dataset


def _items_shard(cfg, dim=8, seed=3):
    """Write the finished item-embedding shard a history-query teacher needs (no LLM)."""
    from teacher.artifacts import load_teacher_data, work_dir, write_tensors
    from teacher.fingerprints import embed_fingerprint
    from teacher.shards import mark_done, part

    data = load_teacher_data(cfg.dataset)
    items = np.random.default_rng(seed).normal(size=(data.n_items, dim)).astype(np.float32)
    p = part(work_dir(cfg), "embed", "items", 0, 1)
    write_tensors({"ids": np.arange(data.n_items), "embeddings": items}, p.path("safetensors"))
    mark_done(p, embed_fingerprint(cfg, data))
    return data, items


def test_history_query_is_the_hand_computed_weighted_mean():
    items = np.arange(12, dtype=np.float32).reshape(4, 3) ** 1.5  # N = 4, padding id 4
    hist = np.array([[0, 2, 3, 4], [1, 4, 4, 4]])
    lens = np.array([3, 1])
    mean = history_queries(items, hist, lens, "history_mean")
    np.testing.assert_allclose(mean[0], (items[0] + items[2] + items[3]) / 3, rtol=1e-6)
    np.testing.assert_allclose(mean[1], items[1], rtol=1e-6)
    last = history_queries(items, hist, lens, "history_last")
    np.testing.assert_allclose(last, items[[3, 1]], rtol=1e-6)  # the newest item (oldest first, right-padded)
    dec = history_queries(items, hist, lens, "history_decay", decay=0.5)
    w = np.array([0.25, 0.5, 1.0]) / 1.75  # oldest .. newest
    np.testing.assert_allclose(dec[0], w[0] * items[0] + w[1] * items[2] + w[2] * items[3], rtol=1e-6)
    np.testing.assert_allclose(history_queries(items, hist, lens, "history_decay", decay=1.0), mean, rtol=1e-6)


def test_padding_positions_never_contribute():
    items = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    hist = np.array([[1, 2, 5, 5, 5]])
    for kind in ("history_mean", "history_last", "history_decay"):
        w = history_weights(np.array([2]), 5, kind, 0.7)
        assert np.all(w[0, 2:] == 0) and w[0].sum() == pytest.approx(1.0)
        other = hist.copy()
        other[0, 2:] = [0, 3, 4]  # garbage in the padded tail must not change the query
        np.testing.assert_array_equal(history_queries(items, hist, [2], kind, 0.7),
                                      history_queries(items, other, [2], kind, 0.7))
    with pytest.raises(ConfigError, match="decay"):
        history_weights(np.array([2]), 5, "history_decay", 0.0)
    with pytest.raises(ConfigError, match="query.kind"):
        history_weights(np.array([2]), 5, "generated")


def test_history_teacher_phases_manifest_gamma_zero_and_loader(tmp_path):
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.data.knowledge import load_teacher
    from dllm2rec.readers import read_parquet
    from teacher.artifacts import merge, read_rank_table
    from teacher.collab_sweep import run_sweep
    from teacher.generate import generate_phase
    from teacher.ground import exact_topk_torch, ground_phase

    ds = tiny_dataset(tmp_path / "ds", n_rows=(30, 6, 6))
    kind = ["query.kind=history_decay", "query.decay=0.6"]
    plain = teacher_cfg(ds, tmp_path / "plain", *kind)
    data, items = _items_shard(plain)
    assert generate_phase(plain, 0, 1, progress=False)["done"] == []  # no generation at all
    assert not (tmp_path / "plain" / "work" / "generate").exists()
    for rank in (0, 1):  # two ground shards: the rows split as `teacher generate` would split them
        ground_phase(plain, rank, 2, progress=False)
    m = merge(teacher_cfg(ds, tmp_path / "plain", *kind, "ground.top_n=5"))
    assert m["query"] == {"kind": "history_decay", "source": "weighted mean of the history items' title embeddings",
                          "generation": False, "decay": 0.6}
    assert m["engine"]["generate"] == "none" and m["decoding"] is None and m["collaborative"] is False
    valid = data.splits["valid"]
    q = history_queries(items, valid["history"], valid["history_len"], "history_decay", 0.6)
    ids, _ = exact_topk_torch(q, items, 5)
    rank = read_rank_table(tmp_path / "plain", "valid")
    np.testing.assert_array_equal(rank["topk_ids"], ids)
    assert "generated" not in read_parquet(tmp_path / "plain" / "rank_valid.parquet").column_names

    zero = teacher_cfg(ds, tmp_path / "zero", *kind, "ground.collab=cooc", "ground.gamma=0", "ground.collab_dim=4")
    _items_shard(zero)
    ground_phase(zero, 0, 1, progress=False)
    mz = merge(zero)
    for split in ("train", "valid", "test"):
        a, b = read_rank_table(tmp_path / "plain", split), read_rank_table(tmp_path / "zero", split)
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_allclose(a["gt_dist"], b["gt_dist"], rtol=1e-5)
    assert mz["collaborative"] is True and mz["query"]["kind"] == "history_decay" and mz["metrics"] == m["metrics"]
    res = run_sweep(teacher_cfg(ds, tmp_path / "zero", *kind, "ground.collab=cooc", "ground.collab_dim=4"), "0,2", "valid", "ndcg@20")
    assert res["results"][0]["hr@20"] == m["metrics"]["valid"]["hr@20"]
    assert (tmp_path / "zero" / "gamma_sweep_cooc_valid_history_decay0.6.json").is_file()

    t = load_teacher(tmp_path / "plain", load_dataset(ds))  # the student's one teacher loader
    assert t.topk_ids.shape == (30, 5) and t.embeddings.shape[0] == data.n_items
    np.testing.assert_array_equal(t.topk_ids, read_rank_table(tmp_path / "plain", "train")["topk_ids"])


def test_bigrec_fingerprints_ignore_the_query_settings_and_config_checks(tmp_path):
    from teacher.artifacts import load_teacher_data
    from teacher.fingerprints import embed_fingerprint, ground_fingerprint

    ds = tiny_dataset(tmp_path / "ds")
    data = load_teacher_data(ds)
    a, b = teacher_cfg(ds, tmp_path / "a"), teacher_cfg(ds, tmp_path / "a", "query.decay=0.3")
    assert ground_fingerprint(a, data) == ground_fingerprint(b, data)  # generated path: unchanged
    h1 = teacher_cfg(ds, tmp_path / "a", "query.kind=history_mean")
    h2 = teacher_cfg(ds, tmp_path / "a", "query.kind=history_last")
    assert embed_fingerprint(h1, data) == embed_fingerprint(h2, data)  # one catalogue embedding serves all kinds
    assert len({ground_fingerprint(c, data) for c in (a, h1, h2)}) == 3
    with pytest.raises(ConfigError, match="query.kind"):
        teacher_cfg(ds, tmp_path / "a", "query.kind=bogus")
    with pytest.raises(ConfigError, match="query.decay"):
        teacher_cfg(ds, tmp_path / "a", "query.decay=1.5")


def test_query_study_gamma_zero_is_plain_and_cooc_only_ties_count_against_the_target(tmp_path):
    from teacher.artifacts import merge
    from teacher.ground import ground_phase
    from teacher.query_study import _cooc_only_ranks, study

    assert _cooc_only_ranks(np.array([[0.5, 0.0, 0.0, 0.9]]), np.array([1])).tolist() == [4]
    ds = tiny_dataset(tmp_path / "ds", n_rows=(30, 8, 6))
    cfg = teacher_cfg(ds, tmp_path / "t", "query.kind=history_mean", "ground.collab_dim=4", "ground.ks=[5,20]")
    _items_shard(cfg)
    ground_phase(cfg, 0, 1, progress=False)
    m = merge(cfg)
    res = study(cfg, "history_mean,history_last", [0.0, 3.0], "valid", "ndcg@20", 4)
    r0 = next(r for r in res["results"] if r["kind"] == "history_mean" and r["gamma"] == 0.0)
    assert r0["all"] == m["metrics"]["valid"] and res["rows"] == 8
    assert {tuple(b[:2]) for b in res["best"]} == {("cooc_only", None), ("history_mean", None), ("history_last", None)}
