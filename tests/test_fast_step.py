"""train.fast_step: the same function as the default step with fewer operations.

Each piece is checked against the default path it replaces (same values up to rounding, same
top-k ids), the compiled kernels are checked to fall back to eager code when compiling fails, and
the trainer's warm-up is checked to leave no compilation inside a step. The first compile of the
fused kernels takes ~10-30 s on a cold Inductor cache; the tests share it (one process).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from dllm2rec.config import load_config
from dllm2rec.errors import ConfigError
from dllm2rec.losses import fused, softmax
from dllm2rec.losses.base import dro_loss, item_popularity_weights
from dllm2rec.models.sasrec import SASRec


def _history(b: int, L: int, n: int, gen: torch.Generator):
    lengths = torch.randint(1, L + 1, (b,), generator=gen)
    hist = torch.randint(0, n, (b, L), generator=gen)
    hist[torch.arange(L)[None, :] >= lengths[:, None]] = n  # right padding, as the splits store it
    return hist, lengths


@pytest.mark.parametrize("heads,blocks", [(1, 1), (2, 1), (2, 2)])
def test_readout_only_sasrec_matches_all_positions(heads, blocks):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, L = 50, 7
    full = SASRec(n, 16, L, heads, blocks, dropout=0.0)
    fast = SASRec(n, 16, L, heads, blocks, dropout=0.0, readout_only=True)
    fast.load_state_dict(full.state_dict())
    hist, lengths = _history(33, L, n, gen)
    a, b = full.encode(hist, lengths), fast.encode(hist, lengths)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(full.named_parameters(), fast.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_readout_only_is_not_the_all_positions_path_for_other_positions():
    # A mutation check of the test above: reading position 0 instead of len-1 must differ.
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    m = SASRec(30, 8, 5, 1, 1, dropout=0.0, readout_only=True).eval()
    hist, lengths = _history(16, 5, 30, gen)
    lengths = lengths.clamp(min=2)
    assert not torch.allclose(m.encode(hist, lengths), m.encode(hist, torch.ones_like(lengths)))


def _dro_case(b: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, 16, generator=g).requires_grad_()
    w = (torch.randn(n, 16, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(n, generator=g) * 0.1).requires_grad_()
    p = item_popularity_weights(torch.randint(0, n, (4 * n,), generator=g), n)
    cols = torch.randint(0, n, (b, 4), generator=g)
    cols[:, 2] = cols[:, 0]  # a repeated id in a row's set
    return h, w, bias, p, cols


def _dro(case, use_fused: bool, dtype):
    h, w, bias, p, cols = case
    for t in (h, w, bias):
        t.grad = None
    out, top = dro_loss(h, w, bias, cols, p, 1.0, 1 << 30, topk=10, matmul_dtype=dtype, use_fused=use_fused)
    (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), top, h.grad.clone(), w.grad.clone(), bias.grad.clone()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("block_elems", [1 << 20, 4096])  # one block / many blocks with a ragged tail
def test_fused_dro_pass_matches_the_eager_pass(dtype, block_elems, monkeypatch):
    monkeypatch.setattr(softmax, "BLOCK_ELEMS", block_elems)
    # 3000 = 46 groups of 64 + 56: the group top-k (it needs N >= 4 k 64) and a ragged tail narrower than a group
    case = _dro_case(37, 3000)
    ref, got = _dro(case, False, dtype), _dro(case, True, dtype)
    assert fused.compiled("dro_block")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], ref[1])  # the student's top-10: same ids, same order
    if dtype is None:
        for a, b in zip(got[2:], ref[2:]):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6
        return
    # bf16 products: both paths round (their blocks differ), so each is held to the fp32 gradients:
    # the fused path may not be further from them than twice the eager bf16 path's distance.
    exact = _dro(case, False, None)
    for a, b, x in zip(got[2:], ref[2:], exact[2:]):
        assert (a - x).abs().max() <= 2 * (b - x).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_catalogue_pass_ignores_padding_and_keeps_excluded_ids_in_the_top_k(dtype, monkeypatch):
    # The fused pass marks excluded ids NaN in its product buffer; padding ids (outside 0..N-1) must
    # be ignored, an excluded id must still compete for the student's top-k with its true score,
    # and the product buffer's NaN marks must not reach the kept factors (backward).
    monkeypatch.setattr(softmax, "BLOCK_ELEMS", 4096)
    h, w, bias, p, cols = _dro_case(23, 3000, seed=5)
    best = (h.detach() @ w.detach().t() + bias.detach()).argmax(1)
    excl = torch.cat([cols, best[:, None], torch.full((23, 2), 3000), torch.full((23, 1), -1)], 1)
    out = {}
    for use_fused in (False, True):
        for t in (h, w, bias):
            t.grad = None
        lse, top = softmax.catalogue_logsumexp(h, w, bias, 1 << 30, p=p, beta=0.7, exclude=excl, topk=10,
                                               matmul_dtype=dtype, use_fused=use_fused)
        lse.sum().backward()
        out[use_fused] = lse.detach(), top, h.grad.clone(), w.grad.clone(), bias.grad.clone()
    ref, got = out[False], out[True]
    assert torch.isfinite(got[0]).all()
    tol = 1e-5 if dtype is None else 2e-3
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
    assert torch.equal(got[1], ref[1])
    assert (got[1][:, 0] == best).all()  # each row's best item is excluded from the sum, not from the top-k
    for a, b in zip(got[2:], ref[2:]):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= (1e-5 if dtype is None else 2e-2) * b.abs().max() + 1e-6


def test_fused_kernels_fall_back_to_eager_when_compiling_fails(monkeypatch):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(fused, "_RUN", {})
    monkeypatch.setattr(torch, "compile", broken)
    case = _dro_case(9, 300, seed=3)
    ref = _dro(case, False, None)
    with pytest.warns(RuntimeWarning, match="torch.compile of dro_block failed"):
        got = _dro(case, True, None)
    assert not fused.compiled("dro_block")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], ref[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per kernel, not one per call
        _dro(case, True, None)


def test_add_rows_gradient_equals_plain_indexing():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 6, generator=g, requires_grad=True)
    ids = torch.randint(0, 40, (11, 5), generator=g)
    up = torch.randn(11, 5, 6, generator=g)
    (softmax.gather_rows(w, ids, fast=True) * up).sum().backward()
    fast, w.grad = w.grad, None
    (w[ids] * up).sum().backward()
    torch.testing.assert_close(fast, w.grad, rtol=1e-6, atol=1e-6)
    assert fast.abs().sum() > 0


def test_warm_up_leaves_no_compilation_for_the_step(monkeypatch):
    import torch._dynamo

    from dllm2rec.eval.metrics import rank_of_targets

    n, rows = 700, 48
    monkeypatch.setattr(softmax, "BLOCK_ELEMS", 8192)
    shapes = softmax.fused_blocks(rows, n, 1 << 30) | softmax.fused_blocks(rows - 5, n, 1 << 30)
    assert len({w for _, w in shapes}) >= 2  # full blocks and a ragged last block
    for dtype in (None, torch.bfloat16):
        fused.warm_up(sorted(shapes), n, dtype)
    g = torch.Generator().manual_seed(7)
    with torch._dynamo.config.patch(error_on_recompile=True):  # raises if a step compiles again
        for b in (rows, rows - 5):
            for dtype in (None, torch.bfloat16):
                _dro(_dro_case(b, n, seed=b), True, dtype)
                # evaluation's blocks have other shapes (rows, widths): still no compilation
                h, w = torch.randn(b + 30, 16, generator=g), torch.randn(n, 16, generator=g)
                rank_of_targets(h, w, torch.zeros(n), torch.randint(0, n, (b + 30,), generator=g), 1 << 30,
                                None, dtype, fused=True)


def test_fast_step_trains_end_to_end_and_reports_the_compile(tmp_path):
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher
    from dllm2rec.cli import main
    from dllm2rec.data.dataset import load_dataset

    ds = synthetic_dataset(tmp_path / "ds", n_items=40, n_train=200, n_valid=48, n_test=48)
    teacher = synthetic_teacher(tmp_path / "teacher", load_dataset(ds), top_n=12, emb_dim=8)
    (tmp_path / "run.yaml").write_text("{}\n")
    base = ["train", "--config", str(tmp_path / "run.yaml"), f"data.path={ds}", "model.name=sasrec", f"distill.teacher={teacher}",
            "distill.rd.enabled=true", "distill.ed.enabled=true", "loss.dro_alpha=0.1", "train.epochs=2",
            "model.dropout=0.0",  # dropout draws differ between the paths; without it only rounding does
            "train.batch_size=64", "train.progress=false"]
    runs = {}
    for fast in (False, True):
        out = tmp_path / f"run_{fast}"
        assert main(base + [f"train.output_dir={out}", f"train.fast_step={str(fast).lower()}"]) == 0
        runs[fast] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        res = json.loads((out / "results.json").read_text())
        assert (res["compile_seconds"] > 0) == fast
    # Same step in exact arithmetic: the first epoch's mean losses agree to rounding-level drift.
    for k, v in runs[False][0]["losses"].items():
        assert runs[True][0]["losses"][k] == pytest.approx(v, rel=2e-3, abs=1e-4), k


def test_fast_step_config_key():
    assert load_config(None, []).train.fast_step is False
    assert load_config(None, ["train.fast_step=true"]).train.fast_step is True
    with pytest.raises(ConfigError, match="train.fast_step"):
        load_config(None, ["train.fast_step=sometimes"])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_evaluation_ranks_equal_the_eager_ranks(dtype, monkeypatch):
    from dllm2rec.eval.metrics import rank_of_targets

    monkeypatch.setattr(softmax, "BLOCK_ELEMS", 8192)  # several item blocks, a ragged last one
    g = torch.Generator().manual_seed(4)
    n = 700
    h, w, b = torch.randn(90, 16, generator=g), torch.randn(n, 16, generator=g) * 0.3, torch.randn(n, generator=g) * 0.1
    target = torch.randint(0, n, (90,), generator=g)
    exclude = torch.cat([torch.randint(0, n, (90, 6), generator=g), target[:, None], torch.full((90, 2), n)], 1)
    for excl in (None, exclude):
        ref = rank_of_targets(h, w, b, target, 1 << 30, excl, dtype)
        got = rank_of_targets(h, w, b, target, 1 << 30, excl, dtype, fused=True)
        if dtype is None:  # fp32: the bias is added after the product, which may move a near-tie
            assert (got != ref).float().mean() <= 0.02 and (got - ref).abs().max() <= 2
        else:  # the same score values: the same ranks
            assert torch.equal(got, ref)
    # the exclusions and the target are really left out (not a pass-through of the eager result)
    plain = rank_of_targets(h, w, b, target, 1 << 30, None, dtype, fused=True)
    masked = rank_of_targets(h, w, b, target, 1 << 30, exclude, dtype, fused=True)
    assert (masked <= plain).all() and (masked < plain).any()
    assert (plain >= 1).all() and (plain <= n).all()


@pytest.mark.parametrize("dro_alpha,expect", [(0.0, {"count_greater"}), (0.1, {"count_greater", "dro_block"})])
def test_prepare_compiles_the_evaluation_kernel_even_without_a_dro_pass(dro_alpha, expect, monkeypatch):
    from dllm2rec.train.objective import StepObjective

    monkeypatch.setattr(fused, "_RUN", {})
    n = 300
    cfg = load_config(None, ["train.fast_step=true", f"loss.dro_alpha={dro_alpha}"])
    targets = torch.randint(0, n, (500,), generator=torch.Generator().manual_seed(0))
    obj = StepObjective(cfg, n, targets, None)
    assert obj.prepare({64, 17}) > 0
    assert {k for k in ("count_greater", "dro_block") if fused.compiled(k)} == expect
    off = StepObjective(load_config(None, [f"loss.dro_alpha={dro_alpha}"]), n, targets, None)
    assert off.prepare({64}) == 0.0
