"""RD weights (both variants, every switch) and RD losses against hand-computed values."""
import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from dllm2rec.config import RDConfig
from dllm2rec.losses.distill import rd_loss_official, rd_loss_paper, rd_weights, student_topk_membership

DIST = torch.tensor([[0.0, 1.0, 2.0]])
IN_TOP = torch.tensor([[True, False, True]])


def _cfg(**kw):
    return dataclasses.replace(RDConfig(enabled=True), **kw)


def _hand_official(gp=0.3, gc=0.5, go=0.1, use=(True, True, True)):
    wp = [math.exp(-k) for k in (1, 2, 3)]
    wp = [x / sum(wp) for x in wp]
    wc = [math.exp(-d) + 1e-8 for d in (0.0, 1.0, 2.0)]
    wc = [x / sum(wc) for x in wc]
    wo = [1 + 1e-8, 1e-8, 1 + 1e-8]
    w = [gp * use[0] * a + gc * use[1] * c + go * use[2] * o for a, c, o in zip(wp, wc, wo)]
    return [x / sum(w) for x in w]


def test_official_weights_hand_values():
    got = rd_weights(DIST, IN_TOP, None, _cfg())
    assert got[0].tolist() == pytest.approx(_hand_official(), rel=1e-6)
    # by hand: wp = wc = [.665241, .244728, .090031], wo = [1, 0, 1]; w = .8 wp + .1 wo sums to 1
    assert got[0].tolist() == pytest.approx([0.632193, 0.195783, 0.172024], abs=2e-6)


@pytest.mark.parametrize("use", [(True, False, False), (False, True, False), (False, False, True),
                                 (True, True, False), (False, True, True)])
def test_official_switches(use):
    cfg = _cfg(use_position=use[0], use_confidence=use[1], use_consistency=use[2])
    got = rd_weights(DIST, IN_TOP, None, cfg)
    assert got[0].tolist() == pytest.approx(_hand_official(use=use), rel=1e-6)
    assert got.sum().item() == pytest.approx(1.0)


def test_official_gammas_and_errors():
    got = rd_weights(DIST, IN_TOP, None, _cfg(gamma_position=1.0, gamma_confidence=0.0, gamma_consistency=2.0))
    assert got[0].tolist() == pytest.approx(_hand_official(1.0, 0.0, 2.0), rel=1e-6)
    with pytest.raises(ValueError, match="switched off"):
        rd_weights(DIST, IN_TOP, None, _cfg(use_position=False, use_confidence=False, use_consistency=False))
    with pytest.raises(ValueError, match="in_student_topk"):
        rd_weights(DIST, None, None, _cfg())


def test_paper_weights_hand_values():
    dist = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.6, 0.7]])
    in_top = torch.tensor([[True, False, True], [False, False, False]])
    gt = torch.tensor([1.0, 3.0])
    got = rd_weights(dist, in_top, gt, _cfg(variant="paper"))
    wp = [math.exp(-k) for k in (1, 2, 3)]
    wp = [x / sum(wp) for x in wp]
    s = 2.0  # mean gt distance
    e = [math.exp(-1.0 / s), math.exp(-3.0 / s)]
    r = [2 * x / sum(e) for x in e]
    expect = [[0.3 * wp[k] + 0.5 * r[b] / 3 + 0.1 * float(in_top[b, k]) for k in range(3)] for b in range(2)]
    torch.testing.assert_close(got, torch.tensor(expect))
    assert got[0].sum() > got[1].sum()  # the more reliable row (smaller gt distance) weighs more
    only_pos = rd_weights(dist, in_top, None, _cfg(variant="paper", use_confidence=False, use_consistency=False))
    torch.testing.assert_close(only_pos, 0.3 * torch.tensor([wp, wp]))
    with pytest.raises(ValueError, match="gt_dist"):
        rd_weights(dist, in_top, None, _cfg(variant="paper"))


@pytest.mark.parametrize("chunk", [3, 7, 65536])
def test_membership_matches_dense_topk(chunk):
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(6, 4, generator=g), torch.randn(23, 4, generator=g), torch.randn(23, generator=g)
    cand = torch.randint(0, 23, (6, 5), generator=g)
    top = (h @ w.t() + b).topk(5, 1).indices
    cand[:, 0] = top[:, 2]  # guarantee some members
    expect = torch.tensor([[int(c) in top[r].tolist() for c in cand[r]] for r in range(6)])
    assert torch.equal(student_topk_membership(h, w, b, cand, 5, chunk), expect)
    assert expect[:, 0].all()


def _reference_rd(model_output, candidate, target_neg, weight, alpha, ps, beta=1.0):
    """Transcription of the reference RD loop (loss_all_rd) on dense scores."""
    B = model_output.shape[0]
    total = 0
    for i_ in range(candidate.size(1)):
        target = candidate[:, i_:i_ + 1]
        pos = torch.gather(model_output, 1, target)
        neg = torch.gather(model_output, 1, target_neg)
        bce = -(torch.ones(B, 1) * torch.log(torch.sigmoid(pos)) + torch.ones(B, 1) * torch.log(torch.sigmoid(1 - neg)))
        if alpha != 0:
            a = torch.sum(torch.exp(torch.mul(model_output * model_output, ps) / beta), 1)
            pos_d = torch.gather(torch.mul(model_output * model_output, ps), 1, target).squeeze()
            pos_l = torch.gather(torch.mul((model_output - 1) * (model_output - 1), ps), 1, target).squeeze()
            dro = torch.log(a - torch.exp(pos_d / beta) + torch.exp(pos_l / beta) + 1e-24)
            total = total + (weight[:, i_:i_ + 1] * bce).mean() + alpha * (weight[:, i_:i_ + 1] * dro).mean()
        else:
            total = total + (weight[:, i_:i_ + 1] * bce).mean()
    return total


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_official_loss_matches_reference_loop(alpha):
    from dllm2rec.losses.base import dro_loss
    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(5, 3, generator=g), torch.randn(12, 3, generator=g), torch.randn(12, generator=g)
    scores = h @ w.t() + b
    cand = torch.randint(0, 12, (5, 4), generator=g)
    neg = torch.randint(0, 12, (5, 1), generator=g)
    wts = torch.softmax(torch.randn(5, 4, generator=g), 1)
    ps = torch.rand(12, generator=g).double()
    dro_c = dro_loss(h, w, b, cand, ps.float(), 1.0, chunk=5) if alpha else None
    got = rd_loss_official(scores.gather(1, cand), scores.gather(1, neg).squeeze(1), wts, dro_c, alpha)
    ref = _reference_rd(scores.double(), cand, neg, wts.double(), alpha, ps)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_loss_hand_values():
    sig = lambda x: 1 / (1 + math.exp(-x))
    y = torch.tensor([[0.0, 1.0]])
    wts = torch.tensor([[0.25, 0.75]])
    neg = torch.tensor([2.0])
    expect = 0.25 * -(math.log(sig(0)) + math.log(sig(1 - 2))) + 0.75 * -(math.log(sig(1)) + math.log(sig(-1)))
    assert rd_loss_official(y, neg, wts).item() == pytest.approx(expect, rel=1e-6)
    dro = torch.tensor([[2.0, 4.0]])
    assert rd_loss_official(y, neg, wts, dro, 0.5).item() == pytest.approx(expect + 0.5 * (0.25 * 2 + 0.75 * 4), rel=1e-6)
    y2 = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    w2 = torch.tensor([[0.25, 0.75], [1.0, 0.5]])
    rows = [-(0.25 * math.log(sig(0)) + 0.75 * math.log(sig(1))), -(1.0 * math.log(sig(2)) + 0.5 * math.log(sig(-1)))]
    assert rd_loss_paper(y2, w2).item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(math.log(0.5))
    with pytest.raises(ValueError, match="dro_cand"):
        rd_loss_official(y, neg, wts, None, 1.0)
