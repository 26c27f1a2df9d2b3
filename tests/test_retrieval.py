"""Dense vs FAISS top-k over a student's output layer (bias folded in as an extra dimension)."""
from __future__ import annotations

import pytest
import torch

from dllm2rec.serve.retrieval import build_retriever, measure_recall


def _layer(n: int, h: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Random float weights give distinct scores with probability 1; bias large enough to matter.
    return torch.randn(n, h, generator=g), torch.randn(n, generator=g) * 2.0, \
        torch.randn(64, h, generator=torch.Generator().manual_seed(seed + 1))


def _reference(weight, bias, h, k, exclude=None):
    scores = h @ weight.T + bias
    if exclude is not None:
        valid = exclude < weight.shape[0]
        for r in range(h.shape[0]):
            scores[r, exclude[r][valid[r]]] = float("-inf")
    return torch.topk(scores, k, dim=1)


def test_dense_equals_full_topk_across_chunks():
    weight, bias, h = _layer(1000, 16)
    ret = build_retriever(weight, bias, method="dense", item_chunk=97)  # many uneven chunks
    s, i = ret.search(h, 20)
    ref_s, ref_i = _reference(weight, bias, h, 20)
    assert torch.equal(i, ref_i)
    assert torch.allclose(s, ref_s, atol=1e-5)


def test_bias_changes_ranking_and_is_respected():
    weight, bias, h = _layer(500, 8)
    no_bias = build_retriever(weight, None, method="flat").search(h, 10)[1]
    with_bias = build_retriever(weight, bias, method="flat").search(h, 10)[1]
    assert not torch.equal(no_bias, with_bias)  # the augmentation is not a no-op
    assert torch.equal(with_bias, _reference(weight, bias, h, 10)[1])


@pytest.mark.parametrize("exclude", [False, True])
def test_exact_faiss_equals_dense(exclude):
    weight, bias, h = _layer(3000, 32, seed=3)
    n = weight.shape[0]
    excl = None
    if exclude:
        g = torch.Generator().manual_seed(7)
        excl = torch.randint(0, n, (h.shape[0], 10), generator=g)
        excl[:, -3:] = n  # padding ids are ignored
        # Make sure exclusions actually bite: exclude each row's current best item.
        excl[:, 0] = _reference(weight, bias, h, 1)[1][:, 0]
    dense = build_retriever(weight, bias, method="dense", item_chunk=512).search(h, 25, excl)
    flat = build_retriever(weight, bias, method="flat").search(h, 25, excl)
    assert torch.equal(dense[1], flat[1])
    assert torch.allclose(dense[0], flat[0], atol=1e-4)
    if exclude:
        ref = _reference(weight, bias, h, 25, excl)
        assert torch.equal(dense[1], ref[1])
        for r in range(h.shape[0]):
            assert not set(dense[1][r].tolist()) & set(excl[r][excl[r] < n].tolist())


def test_fewer_items_than_k_fills_with_minus_one():
    weight, bias, h = _layer(5, 4)
    excl = torch.tensor([[0, 1]] * h.shape[0])
    for method in ("dense", "flat"):
        s, i = build_retriever(weight, bias, method=method).search(h, 8, excl)
        assert (i[:, :3] >= 2).all() and (i[:, 3:] == -1).all()
        assert torch.isneginf(s[:, 3:]).all()


def test_auto_switches_on_catalogue_size_and_batch():
    weight, bias, h = _layer(200, 4)
    small = build_retriever(weight, bias, method="auto", auto_threshold=1000)
    small.search(h[:1], 5)
    assert small.last_method == "dense"
    big = build_retriever(weight, bias, method="auto", auto_threshold=100)
    one = big.search(h[:1], 5)
    assert big.last_method == "flat"
    many = big.search(h, 5)
    assert big.last_method == "dense"
    assert torch.equal(one[1], many[1][:1])  # both paths are exact
    with pytest.raises(ValueError, match="unknown retrieval method"):
        build_retriever(weight, bias, method="annoy")


def test_approximate_indexes_report_recall():
    weight, bias, h = _layer(4000, 16, seed=5)
    exact = build_retriever(weight, bias, method="flat").search(h, 10)[1]
    assert measure_recall(exact, exact) == 1.0
    hnsw = build_retriever(weight, bias, method="hnsw", ef_search=256).search(h, 10)[1]
    ivf_one = build_retriever(weight, bias, method="ivf", nlist=64, nprobe=1).search(h, 10)[1]
    ivf_all = build_retriever(weight, bias, method="ivf", nlist=64, nprobe=64).search(h, 10)[1]
    assert measure_recall(hnsw, exact) > 0.5
    assert measure_recall(ivf_all, exact) == 1.0  # probing every list is exhaustive
    assert measure_recall(ivf_one, exact) < 1.0  # one list of 64 misses some neighbours


def test_serve_bench_smoke(tmp_path):
    import argparse
    import json

    from dllm2rec.bench import serve as serve_bench

    p = argparse.ArgumentParser()
    serve_bench.add_arguments(p)
    out = tmp_path / "serve.md"
    args = p.parse_args(["--catalogues", "300", "--batches", "1,8", "--methods", "dense,flat,ivf", "--seconds", "0.05",
                         "--teacher", "skip", "--hidden", "8", "--max-len", "4", "--out", str(out)])
    assert serve_bench.run(args) == 0
    table = [line for line in out.read_text().splitlines() if line.startswith("| 300 |")]
    assert len(table) == 6  # 3 methods x 2 batch sizes
    data = json.loads(out.with_suffix(".json").read_text())
    assert all(r["rows_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in data["students"])
    assert [r["recall"] is None for r in data["students"]] == [True] * 4 + [False] * 2
