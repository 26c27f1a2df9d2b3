"""Collaborative grounding (teacher/collab.py): gamma 0 is plain grounding, collab re-ranks, no leaks."""
from __future__ import annotations

import numpy as np
import pytest

from dllm2rec.errors import ConfigError
from teacher import collab
from teacher.ground import exact_topk_torch, search, target_ranks


def _rows(rng, r, n, L=6):
    hist = np.full((r, L), n, np.int64)
    lens = rng.integers(1, L + 1, r)
    for i, k in enumerate(lens):
        hist[i, :k] = rng.integers(0, n, k)
    return {"history": hist, "history_len": lens.astype(np.int64), "target": rng.integers(0, n, r).astype(np.int64)}


@pytest.mark.parametrize("kind", ["popularity", "cooc"])
def test_gamma_zero_equals_plain_grounding_exactly(kind):
    rng = np.random.default_rng(0)
    n, d = 40, 6
    items = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(25, d)).astype(np.float32)
    train, rows = _rows(rng, 300, n), _rows(rng, 25, n)
    score = collab.collab_scores(kind, train, rows, n, dim=8, neighbours=10)
    assert score.min() >= 0 and score.max() > 0
    ids, dist, gt, ranks = collab.collab_rank(q, items, score, 0.0, 10, rows["target"])
    ref_ids, ref_dist = exact_topk_torch(q, items, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(dist, ref_dist)
    np.testing.assert_array_equal(ranks, target_ranks(q, items, rows["target"]))
    faiss_ids, _ = search(q, items, 10)  # the plain phase's FAISS path: same lists
    np.testing.assert_array_equal(ids, faiss_ids)
    # gamma > 0 moves collaboratively scored items up: the ranking changes, distances shrink
    ids2, dist2, _, _ = collab.collab_rank(q, items, score, 4.0, 10, rows["target"])
    assert not np.array_equal(ids2, ids)
    assert np.all(np.diff(dist2, axis=1) >= 0)


def test_large_gamma_popularity_tends_to_the_popularity_list():
    rng = np.random.default_rng(1)
    n = 30
    items = rng.normal(size=(n, 4)).astype(np.float32)
    q = rng.normal(size=(5, 4)).astype(np.float32)
    targets = np.r_[np.repeat(7, 50), np.repeat(3, 30), np.repeat(11, 20), np.arange(n)]
    pop = collab.popularity_score(targets, n)
    assert pop[7] == 1.0 and pop[3] == pytest.approx(31 / 51)
    ids, _, _, _ = collab.collab_rank(q, items, pop, 200.0, 3, np.zeros(5, np.int64))
    assert (ids == np.array([7, 3, 11])).all()


def test_stored_distances_that_underflow_float32_are_refused_when_strict():
    rng = np.random.default_rng(2)
    n = 30
    items = rng.normal(size=(n, 4)).astype(np.float32)
    q = rng.normal(size=(5, 4)).astype(np.float32)
    pop = collab.popularity_score(np.r_[np.repeat(7, 50), np.arange(n)], n)  # item 7: collab 1.0
    targets = np.zeros(5, np.int64)
    # (1 + 1) ** -200 ~ 6e-61: below float32's smallest normal, so item 7's stored distance would be 0
    ids, dist, _, _ = collab.collab_rank(q, items, pop, 200.0, 3, targets)  # ranks only: allowed
    assert (ids[:, 0] == 7).all() and (dist[:, 0] == 0).all()
    with pytest.raises(ConfigError, match="ground.gamma = 200.0.*float32"):
        collab.collab_rank(q, items, pop, 200.0, 3, targets, strict=True)
    # a gamma whose distances float32 holds passes strict, with the same ranking
    ids8, dist8, _, _ = collab.collab_rank(q, items, pop, 8.0, 3, targets, strict=True)
    assert (dist8 > 0).all()


def test_cooc_factors_come_from_cooccurrence():
    # items 0-4 co-occur only among themselves, 5-9 only among themselves
    rng = np.random.default_rng(2)
    n, r = 10, 400
    block = rng.integers(0, 2, r) * 5
    hist = (block[:, None] + rng.integers(0, 5, (r, 3))).astype(np.int64)
    tgt = block + rng.integers(0, 5, r)
    f = collab.cooccurrence_factors(hist, np.full(r, 3), tgt, n, dim=4)
    s = collab.cooc_scores(f, np.array([[0, 1, n]]), np.array([2]), neighbours=n)[0]
    assert s[:5].min() > s[5:].max()  # the history's own block scores higher
    with pytest.raises(ConfigError, match="collab_dim"):
        collab.cooccurrence_factors(hist, np.full(r, 3), tgt, n, dim=0)
    with pytest.raises(ConfigError, match="gamma"):
        collab.adjust(np.ones(3), np.ones(3), -1.0)
    with pytest.raises(ConfigError, match="collab"):
        collab.collab_scores("bogus", {}, {}, n)


def test_ground_phase_collab_gamma_zero_matches_plain_and_is_labelled(tmp_path):
    from tests.test_teacher_fast import fake_llm_shards, teacher_cfg, tiny_dataset
    from teacher.artifacts import merge, read_rank_table
    from teacher.ground import ground_phase

    ds = tiny_dataset(tmp_path / "ds", n_rows=(30, 6, 6))
    plain = teacher_cfg(ds, tmp_path / "plain")
    zero = teacher_cfg(ds, tmp_path / "zero", "ground.collab=cooc", "ground.gamma=0", "ground.collab_dim=4")
    pop = teacher_cfg(ds, tmp_path / "pop", "ground.collab=popularity", "ground.gamma=3")
    for cfg in (plain, zero, pop):
        fake_llm_shards(cfg, 0, 1)
        ground_phase(cfg, 0, 1, progress=False)
    mp, mz, mpop = merge(plain), merge(zero), merge(pop)
    for split in ("train", "valid", "test"):
        a, b = read_rank_table(tmp_path / "plain", split), read_rank_table(tmp_path / "zero", split)
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_allclose(a["topk_dist"], b["topk_dist"], rtol=1e-6)
        np.testing.assert_allclose(a["gt_dist"], b["gt_dist"], rtol=1e-5)
    assert mp["collaborative"] is False and mz["collaborative"] is True and mz["collab"]["kind"] == "cooc"
    assert mp["metrics"] == mz["metrics"] and mpop["collab"]["gamma"] == 3.0
    with pytest.raises(ConfigError, match="ground.gamma"):
        teacher_cfg(ds, tmp_path / "x", "ground.gamma=-1")


def test_sweep_gamma_reads_the_embed_shards_and_gamma_zero_is_plain(tmp_path):
    from tests.test_teacher_fast import fake_llm_shards, teacher_cfg, tiny_dataset
    from teacher.artifacts import merge
    from teacher.collab_sweep import run_sweep
    from teacher.ground import ground_phase

    ds = tiny_dataset(tmp_path / "ds", n_rows=(30, 6, 6))
    plain = teacher_cfg(ds, tmp_path / "t")
    fake_llm_shards(plain, 0, 1)
    ground_phase(plain, 0, 1, progress=False)
    m = merge(plain)
    cfg = teacher_cfg(ds, tmp_path / "t", "ground.collab=popularity", "ground.ks=[1,5]")
    res = run_sweep(cfg, "0,1,50", "valid", "ndcg@5")
    assert [r["gamma"] for r in res["results"]] == [0.0, 1.0, 50.0] and res["rows"] == 6
    assert res["results"][0]["hr@5"] == m["metrics"]["valid"]["hr@5"]
    assert (tmp_path / "t" / "gamma_sweep_popularity_valid.md").is_file()
    with pytest.raises(ConfigError, match="gammas"):
        run_sweep(cfg, "0,-1", "valid", "ndcg@5")
    part = run_sweep(cfg, "0", "valid", "ndcg@5", "2:5")
    assert part["rows"] == 3 and (tmp_path / "t" / "gamma_sweep_popularity_valid_rows2-5.json").is_file()
    with pytest.raises(ConfigError, match="selects no row"):
        run_sweep(cfg, "0", "valid", "ndcg@5", "50:60")
