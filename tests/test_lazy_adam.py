"""train.optimizer=lazy_adam: row-sparse catalogue gradients and the lazy row-wise Adam step."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dllm2rec.cli import main
from dllm2rec.data.dataset import load_dataset
from dllm2rec.losses import softmax
from dllm2rec.models import build_student
from dllm2rec.config import ModelConfig
from dllm2rec.train.lazy_adam import LazyAdam
from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher


def _reference_rows(p0, grads, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """Row-by-row lazy Adam in float64 Python: grads = list of {row: grad vector}."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        for r, gr in g.items():
            gr = gr.double()
            m[r] = b1 * m[r] + (1 - b1) * gr
            v[r] = b2 * v[r] + (1 - b2) * gr * gr
            denom = (v[r].sqrt() / math.sqrt(1 - b2 ** t)) + eps
            p[r] = p[r] - lr / (1 - b1 ** t) * m[r] / denom
    return p, m, v


def test_lazy_step_matches_row_reference_and_leaves_other_rows():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(7, 3))
    p0 = w.detach().clone()
    opt = LazyAdam([w], lr=0.01)
    batches = [torch.tensor([1, 4, 4]), torch.tensor([0, 1]), torch.tensor([6])]
    grads = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        out = softmax.gather_rows(w, ids, sparse=True)
        (out * torch.arange(1.0, 1.0 + out.numel()).reshape(out.shape)).sum().backward()
        assert w.grad.is_sparse
        grads.append({int(r): g for r, g in zip(*(lambda c: (c.indices()[0], c.values()))(w.grad.coalesce()))})
        opt.step()
    ref_p, ref_m, ref_v = _reference_rows(p0, grads)
    assert torch.allclose(w.detach().double(), ref_p, atol=1e-6)
    assert torch.allclose(opt.state[w]["exp_avg"].double(), ref_m, atol=1e-7)
    assert torch.allclose(opt.state[w]["exp_avg_sq"].double(), ref_v, atol=1e-9)
    for untouched in (2, 3, 5):  # never in a batch: weights and moments as they started
        assert torch.equal(w.detach()[untouched], p0[untouched])
        assert not opt.state[w]["exp_avg"][untouched].any()


def test_every_row_touched_equals_adam_and_dense_grads_use_adam():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(a.detach().clone())
    dense_a = torch.nn.Parameter(torch.randn(3))
    dense_b = torch.nn.Parameter(dense_a.detach().clone())
    lazy = LazyAdam([a, dense_a], lr=0.05, weight_decay=0.01, fused=False)
    plain = torch.optim.Adam([b, dense_b], lr=0.05, weight_decay=0.01, foreach=False)
    for step in range(4):
        ids = torch.randperm(5)  # every row, in a new order each step
        for opt, w, d, sparse in ((lazy, a, dense_a, True), (plain, b, dense_b, False)):
            opt.zero_grad(set_to_none=True)
            loss = (softmax.gather_rows(w, ids, sparse) ** 2).sum() * (step + 1) + (d ** 3).sum()
            loss.backward()
            assert w.grad.is_sparse == sparse
            opt.step()
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(dense_a, dense_b)  # the dense parameter took torch's own Adam step
    assert float(lazy.state[a]["step"]) == 4.0


def test_closure_with_sparse_gradients():
    w = torch.nn.Parameter(torch.ones(4, 2))
    opt = LazyAdam([w], lr=0.1)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = softmax.gather_rows(w, torch.tensor([2]), sparse=True).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 2.0
    assert torch.allclose(w[2], torch.full((2,), 0.9)) and torch.equal(w[0], torch.ones(2))


def test_sparse_gathers_give_the_dense_values_and_gradients():
    torch.manual_seed(2)
    n, hd = 30, 6
    h = torch.randn(8, hd)
    grads = {}
    for sparse in (False, True):
        w = torch.nn.Parameter(torch.randn(n, hd, generator=torch.Generator().manual_seed(3)))
        bias = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(4)))
        target = torch.tensor([0, 3, 3, 9, 29, 1, 2, 5])
        cand = torch.randint(0, n, (8, 4), generator=torch.Generator().manual_seed(5))
        logq = torch.log_softmax(torch.randn(n, generator=torch.Generator().manual_seed(6)), 0)
        y = softmax.gather_logits(h, w, bias, cand, sparse).sum() + softmax.sampled_softmax_loss(
            h, w, bias, target, 16, logq, torch.Generator().manual_seed(7), sparse)
        y.backward()
        assert w.grad.is_sparse == sparse and bias.grad.is_sparse == sparse
        grads[sparse] = (float(y.detach()), w.grad.to_dense(), bias.grad.to_dense())
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    assert torch.allclose(grads[True][1], grads[False][1], atol=1e-6)
    assert torch.allclose(grads[True][2], grads[False][2], atol=1e-6)


def test_student_item_embedding_gradient_is_sparse_only_when_asked():
    for sparse in (False, True):
        model = build_student(ModelConfig(name="gru4rec", hidden=8), 20, sparse_grad=sparse)
        hist = torch.tensor([[1, 2, 20], [4, 20, 20]])
        model.encode(hist, torch.tensor([2, 1])).sum().backward()
        assert model.embed.item.weight.grad.is_sparse == sparse


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lazy")
    ds = synthetic_dataset(root / "ds", n_items=60, n_train=256, n_valid=64, n_test=64)
    teacher = synthetic_teacher(root / "teacher", load_dataset(ds), top_n=12, emb_dim=8)
    path = root / "run.yaml"
    path.write_text(
        f"data: {{path: {ds}}}\nmodel: {{name: sasrec}}\n"
        f"distill: {{teacher: {teacher}, rd: {{enabled: false}}, ed: {{enabled: true}}}}\n"
        "loss: {objective: sampled_softmax, num_sampled: 16}\n"
        "train: {epochs: 2, batch_size: 64, progress: false, optimizer: lazy_adam}\n")
    return path


@pytest.mark.parametrize("extra", [[], ["loss.objective=bce", "distill.rd.enabled=true"], ["loss.objective=ce"]])
def test_lazy_adam_trains_and_resumes(run_yaml, tmp_path, extra):
    """Sampled softmax, BCE + RD (sparse gathers) and CE (dense catalogue gradient, same optimiser)
    train; a run stopped after epoch 1 and resumed equals the uninterrupted one."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["train", "--config", str(run_yaml), *extra]
    assert main(args + [f"train.output_dir={full}"]) == 0
    assert main(args + [f"train.output_dir={part}", "train.epochs=1"]) == 0
    assert main(args + [f"train.output_dir={part}", "--resume", "--allow-change", "train.epochs"]) == 0
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert all(v == v and abs(v) < 1e6 for v in x["losses"].values())
        assert x["losses"] == pytest.approx(y["losses"], rel=1e-5)
        assert x["valid"] == pytest.approx(y["valid"], rel=1e-5)
