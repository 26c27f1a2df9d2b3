"""Negative sampling, BCE, popularity weights and DRO against hand values and naive formulas."""
import math

import pytest
import torch
from torch.nn import functional as F

from dllm2rec.losses.base import bce_loss, dro_loss, item_popularity_weights, sample_negatives


def test_negatives_never_in_history_or_target_and_cover_allowed_set():
    n, b = 30, 400
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, n, (b, 10), generator=g)
    hist[:, 7:] = n  # padding
    tgt = torch.randint(0, n, (b,), generator=g)
    seen = torch.zeros(n)
    for _ in range(20):
        neg = sample_negatives(hist, tgt, n, g)
        assert neg.shape == (b,) and neg.dtype == torch.long
        assert ((neg >= 0) & (neg < n)).all()
        assert not (hist == neg[:, None]).any()
        assert not (tgt == neg).any()
        seen += torch.bincount(neg, minlength=n)
    assert (seen > 0).all()


def test_negatives_uniform_over_allowed():
    # row forbids 0..7 (+ target 8); allowed = 9..11 -> each about 1/3
    n = 12
    hist = torch.arange(8).repeat(3000, 1)
    tgt = torch.full((3000,), 8)
    neg = sample_negatives(hist, tgt, n, torch.Generator().manual_seed(1))
    counts = torch.bincount(neg, minlength=n)
    assert counts[:9].sum() == 0
    assert ((counts[9:] - 1000).abs() < 150).all()


def test_negatives_fallback_and_impossible_row():
    n = 1000
    hist = torch.full((2, 999), n)
    hist[0, :998] = torch.arange(998)  # row 0 allows only item 999 (target 998)
    tgt = torch.tensor([998, 5])
    neg = sample_negatives(hist, tgt, n, torch.Generator().manual_seed(2))
    assert int(neg[0]) == 999 and int(neg[1]) != 5
    hist[0, 998] = 999
    with pytest.raises(ValueError, match="row 0"):
        sample_negatives(hist, tgt, n, torch.Generator().manual_seed(2))


def test_bce_hand_value():
    pos, neg = torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])
    sig = lambda x: 1 / (1 + math.exp(-x))
    expect = -(math.log(sig(0)) + math.log(sig(2)) + math.log(1 - sig(1)) + math.log(1 - sig(-1))) / 4
    assert bce_loss(pos, neg).item() == pytest.approx(expect, rel=1e-6)
    ref = F.binary_cross_entropy_with_logits(torch.cat([pos, neg]), torch.tensor([1.0, 1, 0, 0]))
    assert bce_loss(pos, neg).item() == pytest.approx(ref.item(), rel=1e-6)


def test_popularity_weights_hand_value():
    p = item_popularity_weights(torch.tensor([0, 0, 1]), 3)
    expect = [(3 / 6) ** 0.05, (2 / 6) ** 0.05, (1 / 6) ** 0.05]
    assert p.tolist() == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="row 1"):
        item_popularity_weights(torch.tensor([0, 3]), 3)


def _naive_dro(logits, target, p, beta):
    """Dense SPEC formula with explicit loops, float64 terms, exactly rounded sum."""
    out = torch.empty(target.shape, dtype=torch.float64)
    for b in range(target.shape[0]):
        for c in range(target.shape[1]):
            t = int(target[b, c])
            y = logits[b].detach().double()
            terms = [math.exp(float(p[j]) * float(y[j]) ** 2 / beta) for j in range(len(y))]
            terms += [-math.exp(float(p[t]) * float(y[t]) ** 2 / beta), math.exp(float(p[t]) * (float(y[t]) - 1) ** 2 / beta)]
            s = math.fsum(terms)  # exact summation: the subtraction of the target's term cancels exactly
            out[b, c] = math.log(s + 1e-24)
    return out


def _setup(n=11, b=4, h=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hs = (torch.randn(b, h, generator=g) * scale).requires_grad_()
    w = torch.randn(n, h, generator=g).requires_grad_()
    bias = torch.randn(n, generator=g).requires_grad_()
    p = item_popularity_weights(torch.randint(0, n, (40,), generator=g), n)
    return hs, w, bias, p


@pytest.mark.parametrize("chunk", [3, 4, 11, 65536])
def test_dro_matches_naive_formula(chunk):
    hs, w, bias, p = _setup()
    target = torch.tensor([[0, 5, 5, 2], [3, 3, 10, 1], [7, 8, 9, 7], [4, 0, 1, 2]])  # duplicates on purpose
    got = dro_loss(hs, w, bias, target, p, beta=1.0, chunk=chunk)
    expect = _naive_dro(hs @ w.t() + bias, target, p, 1.0)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)
    one = dro_loss(hs, w, bias, target[:, 0], p, beta=1.0, chunk=chunk)
    assert one.shape == (4,)
    torch.testing.assert_close(one.double(), expect[:, 0], rtol=1e-5, atol=1e-5)
    got2 = dro_loss(hs, w, bias, target[:, :1], p, beta=2.5, chunk=chunk)
    torch.testing.assert_close(got2.double(), _naive_dro(hs @ w.t() + bias, target[:, :1], p, 2.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 65536])
def test_dro_gradients_match_dense_autograd(chunk):
    hs, w, bias, p = _setup(seed=1)
    target = torch.tensor([[0, 5, 5], [3, 10, 1], [7, 8, 7], [4, 0, 2]])
    wts = torch.rand(4, 3)
    (dro_loss(hs, w, bias, target, p, 1.0, chunk) * wts).sum().backward()
    got = [x.grad.clone() for x in (hs, w, bias)]
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hs, w, bias))
    y = h64 @ w64.t() + b64
    a = p.double() * y * y
    yt = y.gather(1, target)
    pt = p.double()[target]
    dense = torch.log(torch.exp(a).sum(1, keepdim=True) - torch.exp(pt * yt * yt) + torch.exp(pt * (yt - 1) ** 2) + 1e-24)
    (dense * wts.double()).sum().backward()
    for g_, ref in zip(got, (h64.grad, w64.grad, b64.grad)):
        torch.testing.assert_close(g_.double(), ref, rtol=1e-4, atol=1e-5)


def test_dro_stable_where_float32_naive_overflows():
    # scores around 15: exp(p * 225) overflows float32; the float64 naive formula is the reference
    hs, w, bias, p = _setup(seed=2, scale=3.0)
    y = hs @ w.t() + bias
    assert torch.isinf(torch.exp(p * y * y)).any()
    target = y.argmax(1, keepdim=True)  # the dominant term is the target's: worst case for cancellation
    got = dro_loss(hs, w, bias, target, p, 1.0, chunk=4)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _naive_dro(y.detach(), target, p, 1.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [3, 65536])
def test_dro_topk_shares_the_score_pass(chunk):
    from dllm2rec.losses.distill import membership
    from dllm2rec.eval.metrics import topk_items
    hs, w, bias, p = _setup(seed=3)
    target = torch.tensor([[0, 5], [3, 10], [7, 8], [4, 0]])
    dro, top = dro_loss(hs, w, bias, target, p, 1.0, chunk, topk=4)
    torch.testing.assert_close(dro, dro_loss(hs, w, bias, target, p, 1.0, chunk))
    assert torch.equal(top, topk_items(hs.detach(), w.detach(), bias.detach(), 4))
    assert torch.equal(top, (hs @ w.t() + bias).topk(4, 1).indices)
    mem = membership(target, top)
    assert mem.tolist() == [[int(t) in top[r].tolist() for t in target[r]] for r in range(4)]
    dro.sum().backward()  # the non-differentiable ids do not break backward
    assert hs.grad is not None and torch.isfinite(hs.grad).all()
