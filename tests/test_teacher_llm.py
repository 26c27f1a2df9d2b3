"""Teacher with the real stack: SmolLM2 through vLLM (CPU) and transformers.

Only the tokenizer test runs in the default suite (and only when the converted model is
already cached); engine tests are @slow. Run them with:
    .venv/bin/python -m pytest tests/test_teacher_llm.py -m slow -q
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from teacher import prompts

pytestmark = pytest.mark.llm
REPO = Path(__file__).resolve().parents[1]
DOMAIN = prompts.MOVIES
HISTORIES = [
    ["Toy Story (1995)", "Babe (1995)"],
    ["Seven (Se7en) (1995)", "The Usual Suspects (1995)", "Twelve Monkeys (1995)"],
    ["GoldenEye (1995)"],
]


def _cached_model() -> Path | None:
    from teacher.model import SMOLLM2_FOLDER, cache_dir

    p = cache_dir() / "models" / SMOLLM2_FOLDER
    return p if (p / "SOURCE.txt").is_file() else None


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from teacher.model import fetch_smollm2

    return fetch_smollm2()  # downloads + converts once, then cached


def test_training_text_tokens_extend_prompt_tokens():
    """Fine-tuning can mask the prompt by token count: prompt tokens are a prefix of the text's."""
    path = _cached_model()
    if path is None:
        pytest.skip("SmolLM2 not converted yet (python -m teacher model fetch)")
    from teacher.model import load_tokenizer

    tok = load_tokenizer(path)
    for hist in HISTORIES:
        p = tok(prompts.build_prompt(hist, DOMAIN))["input_ids"]
        t = tok(prompts.build_training_text(hist, "Copycat (1995)", DOMAIN, eos=tok.eos_token))["input_ids"]
        assert t[: len(p)] == p and len(t) > len(p)
        assert t[-1] == tok.eos_token_id


@pytest.mark.slow
def test_vllm_matches_transformers_generation_and_embedding(smollm2):
    """Greedy text equal; beam search runs; LAST-token embedding == HF last hidden state (fp32)."""
    from teacher.embed import hf_embed, vllm_embed
    from teacher.generate import hf_generate, vllm_generate
    from teacher.model import load_hf_model, load_tokenizer, vllm_engine

    ps = [prompts.build_prompt(h, DOMAIN) for h in HISTORIES]
    model, tok = load_hf_model(smollm2, "float32"), load_tokenizer(smollm2)
    hf_text = hf_generate(model, tok, ps, max_new_tokens=24, batch_size=3, progress=False)
    titles = ["Toy Story (1995)", "Mr. Holland's Opus (1995)", "Postino, Il (1994)", ""]
    hf_vec = hf_embed(model, tok, titles, batch_size=4, progress=False)
    llm = vllm_engine(smollm2, "generate", dtype="float32", threads=2, max_model_len=1024)
    v_text = vllm_generate(llm, ps, max_new_tokens=24, progress=False)
    assert v_text == hf_text and all(t.strip() for t in v_text)
    beam = vllm_generate(llm, ps, decoding="beam", beam_width=4, max_new_tokens=12, progress=False)
    assert len(beam) == 3 and all(isinstance(b, str) and not b.startswith("Below is") for b in beam)
    del llm
    emb_llm = vllm_engine(smollm2, "pooling", dtype="float32", threads=2, max_model_len=1024)
    v_vec = vllm_embed(emb_llm, titles, progress=False)
    assert v_vec.shape == hf_vec.shape == (4, 576)
    cos = (v_vec * hf_vec).sum(1) / np.linalg.norm(v_vec, axis=1) / np.linalg.norm(hf_vec, axis=1)
    assert cos.min() >= 0.9999, cos
    assert np.all(np.abs(np.linalg.norm(v_vec, axis=1) - 1.0) > 0.1)  # not normalised


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "teacher", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cli_two_shards_merge_equals_unsharded_and_resume(tmp_path, smollm2):
    import pyarrow.parquet as pq

    from test_teacher_fast import tiny_dataset

    ds = tiny_dataset(tmp_path / "ds", n_rows=(6, 2, 2))
    common = [f"dataset={ds}", "model.dtype=float32", "ground.top_n=5", "generate.max_new_tokens=16",
              "model.max_model_len=1024"]
    cfg = ["--config", str(REPO / "launch/configs/teacher_ml100k.yaml"), "--quiet"]
    _cli("run", *cfg, f"output_dir={tmp_path / 'one'}", *common)
    two = ["--world", "2", f"output_dir={tmp_path / 'two'}", *common]
    first = _cli("run", *cfg, "--rank", "0", *two)
    assert "skipping ground" in first.stdout  # shard 1 has not embedded its items yet
    _cli("run", *cfg, "--rank", "1", *two)
    # the "killed" shard 0 is resumed: generate/embed are not recomputed, only ground runs
    markers = sorted((tmp_path / "two" / "work").rglob("part-00000-of-00002.done"))
    assert {m.parent.parent.name for m in markers} == {"generate", "embed"}
    before = [m.stat().st_mtime_ns for m in markers]
    again = _cli("run", *cfg, "--rank", "0", *two)
    phases = {json.loads(line)["phase"]: json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")}
    assert phases["generate"]["done"] == [] and phases["embed"]["done"] == []
    assert [d["split"] for d in phases["ground"]["done"]] == ["train", "valid", "test"]
    assert [m.stat().st_mtime_ns for m in markers] == before
    _cli("merge", *cfg, f"output_dir={tmp_path / 'two'}", *common)
    for split in ("train", "valid", "test"):
        a = pq.read_table(tmp_path / "one" / f"rank_{split}.parquet").to_pydict()
        b = pq.read_table(tmp_path / "two" / f"rank_{split}.parquet").to_pydict()
        assert a["row_id"] == b["row_id"] and a["generated"] == b["generated"] and a["topk_ids"] == b["topk_ids"]
        np.testing.assert_allclose(np.array(a["topk_dist"]), np.array(b["topk_dist"]), rtol=1e-4)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["emb_dim"] == 576 and manifest["splits"] == {"train": 6, "valid": 2, "test": 2}
    # a changed decoding config invalidates generation (new fingerprint) instead of reusing it
    from teacher.config import load_teacher_config
    from teacher.shards import is_done, part
    from teacher.artifacts import load_teacher_data
    from teacher.generate import generate_fingerprint

    changed = load_teacher_config(None, [f"output_dir={tmp_path / 'two'}", *common, "generate.max_new_tokens=8"])
    fp = generate_fingerprint(changed, load_teacher_data(ds))
    assert not is_done(part(tmp_path / "two" / "work", "generate", "train", 0, 2), fp)


@pytest.mark.slow
def test_vllm_lora_matches_peft_merged(tmp_path, smollm2):
    """A PEFT LoRA (r 8, q/v) served through vLLM LoRA == transformers with the adapter merged."""
    import torch
    from peft import LoraConfig, get_peft_model

    from teacher.generate import hf_generate, vllm_generate
    from teacher.model import load_hf_model, load_tokenizer, lora_rank, resolve_adapter, vllm_engine

    torch.manual_seed(0)
    peft_model = get_peft_model(load_hf_model(smollm2, "float32"), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # random but moderate update, so the adapter changes some outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    kind, adapter = resolve_adapter(str(tmp_path / "adapter"))
    assert kind == "lora" and lora_rank(adapter) == 8
    ps = [prompts.build_prompt(h, DOMAIN) for h in HISTORIES]
    tok = load_tokenizer(smollm2)
    hf_lora = hf_generate(load_hf_model(smollm2, "float32", adapter=adapter), tok, ps, max_new_tokens=16, progress=False)
    hf_base = hf_generate(load_hf_model(smollm2, "float32"), tok, ps, max_new_tokens=16, progress=False)
    llm = vllm_engine(smollm2, "generate", dtype="float32", threads=2, max_model_len=1024, enable_lora=True, max_lora_rank=8)
    assert vllm_generate(llm, ps, max_new_tokens=16, lora_path=str(adapter), progress=False) == hf_lora
    assert vllm_generate(llm, ps, max_new_tokens=16, progress=False) == hf_base
    assert hf_lora != hf_base
