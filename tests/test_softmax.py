"""Chunked softmax objectives vs dense formulas; sampled softmax log-Q correction."""
import math

import pytest
import torch
from torch.nn import functional as F

from dllm2rec.losses.softmax import catalogue_logsumexp, chunked_cross_entropy, sampled_softmax_loss, soft_target_ce


def _params(n=10, b=5, h=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, generator=g).requires_grad_(), torch.randn(n, h, generator=g).requires_grad_(),
            torch.randn(n, generator=g).requires_grad_())


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 65536])
def test_chunked_ce_value_and_grads_match_dense(chunk):
    params = _params()
    h, w, b = params
    target = torch.tensor([0, 9, 3, 3, 7])
    got = chunked_cross_entropy(h, w, b, target, chunk)
    ref = F.cross_entropy(h @ w.t() + b, target)
    torch.testing.assert_close(got, ref)
    for g1, g2 in zip(_grads(got, params), _grads(ref, params)):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 65536])
def test_logsumexp_exclusion_matches_masked_dense(chunk):
    params = _params(seed=1)
    h, w, b = params
    excl = torch.tensor([[0, 1], [9, 10], [10, 10], [4, 4], [2, 8]])  # 10 = padding, ignored
    got = catalogue_logsumexp(h, w, b, chunk, exclude=excl)
    y = h @ w.t() + b
    mask = torch.zeros(5, 11, dtype=torch.bool).scatter_(1, excl, True)[:, :10]
    ref = torch.logsumexp(y.masked_fill(mask, float("-inf")), 1)
    torch.testing.assert_close(got, ref)
    wts = torch.arange(1.0, 6.0)
    for g1, g2 in zip(_grads((got * wts).sum(), params), _grads((ref * wts).sum(), params)):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_sampled_softmax_hand_computation():
    params = _params(n=6, b=3, seed=2)
    h, w, b = params
    target = torch.tensor([0, 2, 5])
    q = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.3, 0.1])
    k = 4
    got = sampled_softmax_loss(h, w, b, target, k, q.log(), torch.Generator().manual_seed(3))
    sampled = torch.multinomial(q, k, replacement=True, generator=torch.Generator().manual_seed(3)).tolist()
    y = (h @ w.t() + b).detach()
    expect = 0.0
    for r in range(3):
        t = int(target[r])
        z = math.exp(y[r, t])
        for s in sampled:
            if s != t:
                z += math.exp(y[r, s]) / (k * float(q[s]))
        expect += -float(y[r, t]) + math.log(z)
    assert got.item() == pytest.approx(expect / 3, rel=1e-5)


def test_sampled_softmax_approaches_full_ce():
    params = _params(n=20, b=8, seed=4)
    h, w, b = params
    target = torch.randint(0, 20, (8,), generator=torch.Generator().manual_seed(5))
    q = torch.softmax(torch.randn(20, generator=torch.Generator().manual_seed(6)), 0)
    full = F.cross_entropy(h @ w.t() + b, target).item()
    err = {}
    for k in (5, 200000):
        vals = [sampled_softmax_loss(h, w, b, target, k, q.log(), torch.Generator().manual_seed(s)).item()
                for s in range(3)]
        err[k] = abs(sum(vals) / 3 - full)
    assert err[200000] < 0.01
    assert err[200000] < err[5]


@pytest.mark.parametrize("chunk", [3, 65536])
def test_soft_target_ce_matches_explicit_distribution(chunk):
    params = _params(seed=7)
    h, w, b = params
    target = torch.tensor([0, 1, 2, 3, 4])
    cand = torch.tensor([[1, 2], [1, 5], [9, 9], [0, 3], [6, 7]])  # repeats and target-in-candidates on purpose
    wts = torch.tensor([[0.75, 0.25], [1.0, 1.0], [0.2, 0.2], [0.5, 0.1], [0.0, 3.0]])
    mix = 0.4
    qd = torch.zeros(5, 10)
    for r in range(5):
        qd[r, target[r]] += 1 - mix
        for c in range(2):
            qd[r, cand[r, c]] += mix * float(wts[r, c] / wts[r].sum())
    assert torch.allclose(qd.sum(1), torch.ones(5))
    ref = -(qd * F.log_softmax(h @ w.t() + b, 1)).sum(1).mean()
    got = soft_target_ce(h, w, b, target, cand, wts, mix, chunk)
    torch.testing.assert_close(got, ref)
    for g1, g2 in zip(_grads(got, params), _grads(ref, params)):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    plain = soft_target_ce(h, w, b, target, cand, wts, 0.0, chunk)
    torch.testing.assert_close(plain, F.cross_entropy(h @ w.t() + b, target))


@pytest.mark.parametrize("c", [64 * 80, 64 * 80 + 37, 700])
@pytest.mark.parametrize("k", [1, 10])
def test_block_topk_equals_topk(c, k):
    from dllm2rec.losses.softmax import block_topk
    g = torch.Generator().manual_seed(c + k)
    s = torch.randn(33, c, generator=g)
    s[0, :k] = 100.0 + torch.arange(k)  # all winners in one group
    s[1, -k:] = 50.0  # winners (tied) in the tail
    v, i = block_topk(s, k)
    rv, ri = s.topk(k, 1)
    torch.testing.assert_close(v, rv)
    assert torch.equal(s.gather(1, i), v)
    # distinct ids whose scores are exactly the top-k values (ids can differ only between ties)
    assert all(len(set(row)) == k for row in i.tolist())
