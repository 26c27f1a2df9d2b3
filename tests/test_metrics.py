"""Full-ranking metrics: ranks, HR/NDCG on known rankings, chunked top-k."""
import math

import pytest
import torch

from dllm2rec.eval.metrics import hr_ndcg, rank_of_targets, topk_items


def _data(b=7, n=29, h=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, generator=g), torch.randn(n, h, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("chunk", [1, 4, 10, 29, 65536])
def test_rank_matches_dense_count(chunk):
    h, w, b = _data()
    target = torch.tensor([0, 28, 5, 5, 13, 7, 20])
    s = h @ w.t() + b
    expect = torch.tensor([1 + int((s[r] > s[r, target[r]]).sum()) for r in range(7)])
    assert torch.equal(rank_of_targets(h, w, b, target, chunk), expect)
    # rank 1 for the arg-max item
    best = s.argmax(1)
    assert (rank_of_targets(h, w, b, best, chunk) == 1).all()


@pytest.mark.parametrize("chunk", [4, 65536])
def test_rank_with_history_exclusion(chunk):
    h, w, b = _data(seed=1)
    s = h @ w.t() + b
    target = s.argsort(1, descending=True)[:, 5]  # every target ranked 6th
    hist = s.argsort(1, descending=True)[:, :3].clone()  # 3 items above it
    hist = torch.cat([hist, torch.full((7, 2), 29), target[:, None]], 1)  # padding, and the target itself
    assert (rank_of_targets(h, w, b, target, chunk) == 6).all()
    assert (rank_of_targets(h, w, b, target, chunk, exclude=hist) == 3).all()


def test_ties_count_in_favour_of_target():
    h = torch.zeros(2, 3)
    w, b = torch.zeros(4, 3), torch.tensor([1.0, 1.0, 2.0, 1.0])
    assert rank_of_targets(h, w, b, torch.tensor([0, 3])).tolist() == [2, 2]


def test_hr_ndcg_known_answers():
    ranks = torch.tensor([1, 2, 5, 11, 30])
    m = hr_ndcg(ranks, (1, 5, 10, 20))
    assert m["hr@1"] == pytest.approx(0.2) and m["hr@5"] == pytest.approx(0.6)
    assert m["hr@10"] == pytest.approx(0.6) and m["hr@20"] == pytest.approx(0.8)
    assert m["ndcg@1"] == pytest.approx(0.2)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(12)) / 5)
    s = hr_ndcg(ranks, (5,), reduce="sum")
    assert s["hr@5"] == pytest.approx(3.0)


@pytest.mark.parametrize("chunk", [1, 3, 8, 65536])
def test_topk_matches_dense(chunk):
    h, w, b = _data(seed=2)
    s = h @ w.t() + b
    assert torch.equal(topk_items(h, w, b, 6, chunk), s.topk(6, 1).indices)
    excl = s.topk(2, 1).indices
    assert torch.equal(topk_items(h, w, b, 4, chunk, exclude=excl), s.topk(6, 1).indices[:, 2:])
    with pytest.raises(ValueError):
        topk_items(h, w, b, 30)


def test_rank_counts_whole_wide_blocks_and_ignores_nan():
    # One row -> item blocks of 2**20 items: every count of the in-place float compare must be exact.
    n = (1 << 20) + 5
    w, b = torch.zeros(n, 2), torch.ones(n)
    b[7] = 0.0  # the lowest score: every other item is above it
    b[9] = float("nan")  # a NaN score never counts as higher (as with ``>``)
    assert rank_of_targets(torch.zeros(1, 2), w, b, torch.tensor([7])).tolist() == [n - 1]
