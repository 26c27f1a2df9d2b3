"""train.matmul_dtype: the default keeps the fp32 arithmetic, bfloat16 stays close to it, bad names are refused."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from dllm2rec import precision
from dllm2rec.config import RunConfig, config_diff, config_to_dict, load_config
from dllm2rec.errors import ConfigError
from dllm2rec.eval.metrics import rank_of_targets
from dllm2rec.losses.base import dro_loss
from dllm2rec.models.embedding import InputEmbedding

BF16 = torch.bfloat16


def _tensors(b=6, n=50, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, generator=g), 0.5 * torch.randn(n, h, generator=g), 0.1 * torch.randn(n, generator=g),
            torch.randint(0, n, (b,), generator=g), torch.rand(n, generator=g))


def test_default_products_are_the_plain_fp32_ops():
    a, w, bias, _, _ = _tensors()
    assert torch.equal(precision.addmm(bias, a, w.t(), None), torch.addmm(bias, a, w.t()))
    assert torch.equal(precision.mm(a, w.t(), None), a @ w.t())
    assert torch.equal(precision.linear(a, w, bias, None), F.linear(a, w, bias))
    assert precision.resolve("float32") is None and precision.resolve("bfloat16") is BF16
    assert RunConfig().train.matmul_dtype == "float32"


@pytest.mark.parametrize("chunk", [7, 65536])
def test_default_dro_equals_a_dense_fp64_recomputation(chunk):
    h, w, b, t, p = _tensors()
    y = (h.double() @ w.double().t() + b.double())
    a = p.double() * y * y
    rows = torch.arange(len(t))
    yt = y[rows, t]
    expect = torch.log(a.exp().sum(1) - a[rows, t].exp() + (p.double()[t] * (yt - 1) ** 2).exp() + 1e-24)
    torch.testing.assert_close(dro_loss(h, w, b, t, p, 1.0, chunk).double(), expect, rtol=1e-5, atol=1e-6)


def _dro_and_grads(dtype, chunk):
    h, w, b, t, p = _tensors(b=16, n=300, h=16, seed=3)
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    cols = torch.cat([t[:, None], torch.randint(0, 300, (16, 4), generator=torch.Generator().manual_seed(4))], 1)
    loss, top = dro_loss(h, w, b, cols, p, 1.0, chunk, topk=5, matmul_dtype=dtype)
    loss.mean().backward()
    return loss.detach(), top, h.grad, w.grad, b.grad


@pytest.mark.parametrize("chunk", [64, 65536])  # recomputing and keeping backward paths
def test_bf16_dro_loss_and_grads_stay_close_to_fp32(chunk):
    ref = _dro_and_grads(None, chunk)
    got = _dro_and_grads(BF16, chunk)
    # Scores rounded to bf16 (relative error <= 2**-8) move each DRO value by well under 1%.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-2, atol=1e-2)
    assert not torch.equal(got[0], ref[0])  # the dtype reached the products
    for g, r in zip(got[2:], ref[2:]):
        cos = F.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        assert cos > 0.99 and g.dtype == torch.float32
    assert (got[1] == ref[1]).float().mean() > 0.8  # top-5 ids: only near-ties may swap


def test_bf16_ed_projection_close_and_default_exact():
    torch.manual_seed(0)
    emb = InputEmbedding(40, 8, llm_dim=300, ed_weight=1.0, learnable_offset=False)
    table = torch.randn(40, 300).half()
    hist = torch.tensor([[1, 5, 5, 40], [39, 0, 2, 3]])  # 40 = padding
    ref = emb(hist, llm_table=table)
    dense = emb.llm_proj(table[hist.clamp(max=39)].float()) * (hist < 40).unsqueeze(-1)
    torch.testing.assert_close(ref, dense)
    ref.square().sum().backward()
    g_ref = emb.llm_proj.weight.grad.clone()
    emb.zero_grad()
    got = emb(hist, llm_table=table, matmul_dtype=BF16)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    got.square().sum().backward()
    assert F.cosine_similarity(emb.llm_proj.weight.grad.flatten(), g_ref.flatten(), dim=0) > 0.99


def test_bf16_ranks_equal_fp32_when_scores_are_well_separated():
    # Scores 0, 1, ..., 49 (exact in bf16): no rounding can reorder them.
    n = 50
    w = torch.zeros(n, 2)
    w[:, 0] = torch.arange(n, dtype=torch.float32)
    h = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    target = torch.tensor([10, 49])
    ref = rank_of_targets(h, w, torch.zeros(n), target)
    assert ref.tolist() == [40, 1]
    assert torch.equal(rank_of_targets(h, w, torch.zeros(n), target, chunk=7, matmul_dtype=BF16), ref)


def test_bf16_ranks_count_rounding_ties_for_the_target():
    # 1 + 2**-10 and 1 + 2**-9 are one bf16 value apart from 1 only below 2**-8: both round to 1.0,
    # so the items above the target in fp32 tie with it in bf16 and count in its favour.
    w = torch.tensor([[1.0], [1.0 + 2 ** -10], [1.0 + 2 ** -9], [0.5]])
    h, target = torch.ones(1, 1), torch.tensor([0])
    assert rank_of_targets(h, w, torch.zeros(4), target).tolist() == [3]
    assert rank_of_targets(h, w, torch.zeros(4), target, matmul_dtype=BF16).tolist() == [1]


def test_unknown_matmul_dtype_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"train\.matmul_dtype.*float16.*bfloat16"):
        load_config(None, ["train.matmul_dtype=float16"])
    with pytest.raises(ValueError, match="unknown matmul dtype 'fp16'"):
        precision.resolve("fp16")
    assert load_config(None, ["train.matmul_dtype=bfloat16"]).train.matmul_dtype == "bfloat16"


def test_configs_saved_before_the_key_existed_are_not_changed():
    now = config_to_dict(RunConfig())
    old = config_to_dict(RunConfig())
    del old["train"]["matmul_dtype"]
    defaults = config_to_dict(RunConfig())
    assert config_diff(old, now, defaults=defaults) == []
    assert config_diff(old, now) == ["train.matmul_dtype"]  # without defaults: reported
    now["train"]["matmul_dtype"] = "bfloat16"
    assert config_diff(old, now, defaults=defaults) == ["train.matmul_dtype"]


def test_bf16_step_objective_close_to_fp32(tmp_path):
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher
    from dllm2rec.bench.train import bench_config
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.train.batches import make_batch
    from dllm2rec.train.inputs import load_inputs
    from dllm2rec.train.objective import Encoder, StepObjective

    ds = synthetic_dataset(tmp_path / "ds", n_items=200, n_train=300, n_valid=8, n_test=8)
    teacher = synthetic_teacher(tmp_path / "t", load_dataset(ds), top_n=12, emb_dim=48, emb_dtype="float16")
    terms = {}
    for name in ("float32", "bfloat16"):
        cfg = bench_config(ds, teacher, tmp_path / name, 1, name)
        inputs = load_inputs(cfg)  # same seed -> same initial weights
        obj = StepObjective(cfg, inputs.dataset.n_items, inputs.splits["train"].target, inputs.teacher)
        batch = make_batch(inputs.splits["train"], torch.arange(64), inputs.teacher, obj.rd_k)
        enc = Encoder(inputs.student, obj.mm_dtype).eval()  # no dropout: the two runs see the same network
        terms[name] = {k: float(v.detach()) for k, v in obj(enc, inputs.student, batch, torch.Generator().manual_seed(0)).items()}
    assert set(terms["float32"]) == {"bce", "dro", "rd"}
    assert terms["bfloat16"] != terms["float32"]  # the dtype reached the products
    for k, v in terms["float32"].items():
        # Observed: relative differences ~5e-6 (one batch of a fresh model); 1e-3 leaves a wide margin.
        assert math.isfinite(terms["bfloat16"][k])
        assert terms["bfloat16"][k] == pytest.approx(v, rel=1e-3), k


@pytest.mark.parametrize("src", [torch.float16, torch.float32])
def test_bf16_ed_from_a_precast_table_is_bit_identical(src):
    # The trainer casts the teacher table to the product dtype once (StepObjective); the ED output
    # and the projection's gradients must equal those of casting each gathered slice.
    torch.manual_seed(0)
    emb = InputEmbedding(600, 8, llm_dim=64, ed_weight=1.0)
    table = torch.randn(600, 64).to(src)
    hist = torch.randint(0, 601, (70, 9))  # > 256 distinct ids: several gathered slices; 600 = padding
    outs = []
    for t in (table, table.to(BF16)):
        emb.zero_grad()
        out = emb(hist, llm_table=t, matmul_dtype=BF16)
        out.square().sum().backward()
        outs.append((out.detach(), emb.llm_proj.weight.grad.clone(), emb.llm_proj.bias.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_step_objective_casts_the_ed_table_only_for_reduced_products(tmp_path):
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher
    from dllm2rec.bench.train import bench_config
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.train.inputs import load_inputs
    from dllm2rec.train.objective import StepObjective

    ds = synthetic_dataset(tmp_path / "ds", n_items=50, n_train=40, n_valid=4, n_test=4)
    teacher = synthetic_teacher(tmp_path / "t", load_dataset(ds), top_n=12, emb_dim=16, emb_dtype="float16")
    for name, want in (("float32", torch.float16), ("bfloat16", BF16)):
        cfg = bench_config(ds, teacher, tmp_path / name, 1, name)
        inputs = load_inputs(cfg)
        obj = StepObjective(cfg, inputs.dataset.n_items, inputs.splits["train"].target, inputs.teacher)
        assert obj.llm_table.dtype == want
        torch.testing.assert_close(obj.llm_table.float(), inputs.teacher.embeddings.to(want).float(), rtol=0, atol=0)
