"""bench train helpers: the per-step profile (parts present, adding up, the optimizer really steps)
and the revision export behind ``--compare``."""
from __future__ import annotations

import pytest
import torch

from dllm2rec.bench.step_profile import profile_markdown, profile_steps


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher
    from dllm2rec.bench.train import bench_config
    from dllm2rec.data.dataset import load_dataset

    root = tmp_path_factory.mktemp("bt")
    ds = synthetic_dataset(root / "ds", n_items=300, n_train=1200, n_valid=64, n_test=64)
    teacher = synthetic_teacher(root / "t", load_dataset(ds), top_n=20, emb_dim=32, emb_dtype="float16")
    return bench_config(ds, teacher, root / "run", 1)


def test_profile_parts_cover_the_step_and_optimizer_steps(tiny_cfg, monkeypatch):
    from dllm2rec.bench import step_profile
    from dllm2rec.train import loop

    before = {}
    real = loop.make_optimizer

    def spy(module, cfg):  # remember the initial weights of the profiled model
        before.update({k: v.detach().clone() for k, v in module.state_dict().items()})
        before["_module"] = module
        return real(module, cfg)

    monkeypatch.setattr(loop, "make_optimizer", spy)
    p = profile_steps(tiny_cfg, steps=3, warmup=1)
    expected = {"batch", "forward: ED gather/projection", "forward: encoder (rest)", "forward: DRO catalogue pass",
                "forward: RD", "forward: base loss + other", "backward: DRO catalogue pass",
                "backward: ED gather/projection", "backward: rest", "optimizer"}
    assert set(p["parts"]) == expected and p["steps"] == 3
    assert p["parts"]["forward: DRO catalogue pass"] > 0 and p["parts"]["backward: DRO catalogue pass"] > 0
    assert p["parts"]["forward: ED gather/projection"] > 0 and p["parts"]["backward: ED gather/projection"] > 0
    assert 0.5 * p["step"] < sum(p["parts"].values()) < 1.5 * p["step"]
    module = before.pop("_module")
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert "student.output.weight" in changed and "student.embed.llm_proj.weight" in changed
    text = "\n".join(profile_markdown(p))
    assert "backward: DRO catalogue pass" in text and "**whole step**" in text
    del step_profile


def test_export_revision(tmp_path):
    from dllm2rec.bench.compare import export_revision, repo_root

    root = repo_root()
    commit = export_revision(root, "HEAD", tmp_path / "old")
    assert len(commit) == 40 and (tmp_path / "old" / "dllm2rec" / "bench" / "train.py").is_file()
    with pytest.raises(SystemExit, match="not a commit"):
        export_revision(root, "no-such-ref-xyz", tmp_path / "bad")


def test_rank_agreement_of_bf16_evaluation(tiny_cfg, tmp_path):
    from dllm2rec.bench.compare import agreement_markdown, rank_agreement
    from dllm2rec.eval.evaluate import split_ranks
    from dllm2rec.eval.metrics import hr_ndcg
    from dllm2rec.train.distributed import make_accelerator
    from dllm2rec.train.inputs import load_inputs

    inputs = load_inputs(tiny_cfg)
    acc, valid = make_accelerator(), inputs.splits["valid"]
    kw = dict(chunk=tiny_cfg.loss.item_chunk, batch_size=32, llm_table=inputs.llm_table)
    a = rank_agreement(inputs.student, tmp_path / "none.safetensors", valid, acc, tiny_cfg,
                       {**kw, "matmul_dtype": torch.bfloat16})
    assert a["weights"].startswith("untrained") and a["rows"] == len(valid) == 64
    assert a["equal_share"] + a["better_share"] + a["worse_share"] == pytest.approx(1.0)
    assert a["fp32"] == hr_ndcg(split_ranks(inputs.student, valid, acc, **kw), [10, 20])
    assert "| ndcg@20 |" in "\n".join(agreement_markdown(a, "bfloat16"))


def test_compare_thread_counts_parse_and_refuse():
    from argparse import Namespace

    from dllm2rec.bench.compare import _thread_counts

    assert _thread_counts(Namespace(compare_threads="1,2", threads=0)) == [1, 2]
    assert _thread_counts(Namespace(compare_threads=None, threads=3)) == [3]
    with pytest.raises(SystemExit, match="--compare-threads"):
        _thread_counts(Namespace(compare_threads="one", threads=0))


def test_sliced_table_projection_at_evaluation_matches_the_training_route(tiny_cfg):
    # 300 teacher rows -> two projection slices in split_ranks; the training route gathers and
    # projects per batch (llm_table=), so both must give the same ranks.
    from dllm2rec.eval.evaluate import split_ranks
    from dllm2rec.eval.metrics import rank_of_targets
    from dllm2rec.train.distributed import make_accelerator
    from dllm2rec.train.inputs import load_inputs

    inputs = load_inputs(tiny_cfg)
    student, valid = inputs.student.eval(), inputs.splits["valid"]
    with torch.no_grad():
        h = student.encode(valid.history, valid.lengths, llm_table=inputs.llm_table)
        expect = rank_of_targets(h, student.output.weight, student.output.bias, valid.target)
    got = split_ranks(student, valid, make_accelerator(), chunk=65536, batch_size=32, llm_table=inputs.llm_table)
    assert inputs.llm_table.shape[0] > 256 and torch.equal(got.long(), expect)


@pytest.mark.parametrize("old_fast", [False, True])
def test_compare_passes_fast_step_to_the_old_tree_only_when_asked(old_fast, monkeypatch, tmp_path):
    from argparse import Namespace

    from dllm2rec.bench import compare

    seen = []

    def fake_measure(tree, args, out, extra=(), threads=None):
        seen.append((tree.name, extra))
        return {"epoch_median": 1.0, "eval_median": 0.1}

    monkeypatch.setattr(compare, "measure_tree", fake_measure)
    monkeypatch.setattr(compare, "export_revision", lambda root, ref, dest: "0" * 40)
    args = Namespace(compare="HEAD", repeats=2, threads=2, matmul_dtype="bfloat16", fast_step=True,
                     old_fast_step=old_fast)
    text, result = compare.compare_revisions(args)
    old = [extra for tree, extra in seen if tree == "old"]
    new = [extra for tree, extra in seen if tree != "old"]
    assert len(old) == len(new) == 2
    assert all("--fast-step" in e and "bfloat16" in e for e in new)
    assert all(("--fast-step" in e) == old_fast for e in old)
    assert ("both with train.fast_step=true" in text) == old_fast
