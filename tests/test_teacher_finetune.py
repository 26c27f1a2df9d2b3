"""LoRA fine-tuning of the teacher (teacher/finetune.py, teacher/finetune_data.py).

Fast tests use a tiny random LLaMA (2 layers, hidden 32) with a byte-level BPE tokenizer
trained in the test, so the real loop (PEFT + Accelerate, saving, merging) runs in seconds.
Tests marked ``llm`` use the real SmolLM2 tokenizer / model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dllm2rec.errors import ConfigError

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TITLES = [f"Movie {chr(65 + i)}{chr(65 + i)} ({1990 + i})" for i in range(12)]


def _split(n_rows: int, offset: int, L: int = 4):
    rng = np.random.default_rng(offset)
    N = len(TITLES)
    hist = np.full((n_rows, L), N, dtype=np.int64)
    lens = rng.integers(1, L + 1, n_rows)
    targets = np.zeros(n_rows, dtype=np.int64)
    for r in range(n_rows):
        start = int(rng.integers(0, N))
        items = [(start + j) % N for j in range(lens[r])]
        hist[r, : lens[r]] = items
        targets[r] = (items[-1] + 1) % N  # a learnable rule: the next title in the catalogue
    return {"row_id": np.arange(offset, offset + n_rows, dtype=np.int64),
            "user": np.array([f"u{offset + r}" for r in range(n_rows)], dtype=object),
            "history": hist, "history_len": lens.astype(np.int64), "target": targets,
            "timestamp": np.arange(offset, offset + n_rows, dtype=np.int64)}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from dllm2rec.data.dataset import DOMAINS, save_dataset

    out = tmp_path_factory.mktemp("data") / "tiny"
    splits = {"train": _split(24, 0), "valid": _split(8, 100), "test": _split(8, 200)}
    save_dataset(out, name="tiny", titles=TITLES, splits=splits, max_history=4,
                 protocol={"timestamps": True}, domain=DOMAINS["movies"], sources=[])
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_dataset):
    """A random 2-layer LLaMA + a byte-level BPE tokenizer trained on the fixture's prompts."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from dllm2rec.data.dataset import load_dataset
    from teacher.finetune_data import split_texts

    ds = load_dataset(tiny_dataset)
    texts = [full for s in ("train", "valid") for _, full in split_texts(ds, s, range(8))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>")
    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _cfg(tiny_dataset, tiny_base, out, **kw):
    from teacher.finetune import load_finetune_config

    base = dict(dataset=str(tiny_dataset), output_dir=str(out), base_model=str(tiny_base), sample_size=16,
                valid_size=8, epochs=3, micro_batch_size=4, effective_batch_size=8, lr=2e-2,
                warmup_ratio=0.0, max_length=128, progress=False, lora_dropout=0.0)
    base.update(kw)
    return load_finetune_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base.items()])


# ---------------------------------------------------------------- config: clear errors


@pytest.mark.parametrize("override, key", [
    ("lora_r=0", "lora_r"), ("lr=-1e-4", "lr"), ("lora_dropout=1.5", "lora_dropout"),
    ("effective_batch_size=100", "effective_batch_size"), ("mixed_precision=fp8", "mixed_precision"),
    ("target_modules=[]", "target_modules"), ("epochs=two", "epochs"), ("lora_rank=8", "lora_rank"),
])
def test_config_rejects_bad_values(override, key):
    from teacher.finetune import load_finetune_config

    with pytest.raises(ConfigError, match=key):
        load_finetune_config(None, [override])


def test_yaml_1_1_words_stay_strings(tmp_path):
    """`mixed_precision=no` (a documented value) is the string 'no', on the command line and in a
    file; only true/false are booleans (PyYAML's default would read no/yes/on/off as booleans)."""
    from teacher.finetune import load_finetune_config

    assert load_finetune_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    f = tmp_path / "ft.yaml"
    f.write_text("mixed_precision: no\ntrain_on_inputs: false\nprogress: True\n")
    cfg = load_finetune_config(f)
    assert (cfg.mixed_precision, cfg.train_on_inputs, cfg.progress) == ("no", False, True)
    with pytest.raises(ConfigError, match="progress"):
        load_finetune_config(None, ["progress=yes"])  # not a boolean any more: a clear error


def test_config_file_and_accumulation(tmp_path):
    from teacher.finetune import accumulation_steps, load_finetune_config

    cfg = load_finetune_config(ROOT / "launch/configs/teacher_finetune_ml100k.yaml", ["micro_batch_size=4"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])
    paper = load_finetune_config(ROOT / "launch/configs/teacher_finetune_paper.yaml")
    assert (paper.sample_size, paper.effective_batch_size, paper.train_on_inputs) == (1024, 128, True)
    assert accumulation_steps(paper, 4) == 128 // (paper.micro_batch_size * 4)
    with pytest.raises(ConfigError, match="processes"):
        accumulation_steps(load_finetune_config(None, ["micro_batch_size=8", "effective_batch_size=24"]), 2)
    with pytest.raises(ConfigError, match="not found"):
        load_finetune_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- data: sampling, masking, padding


def test_sample_rows_is_seeded_distinct_and_bounded():
    from teacher.finetune_data import sample_rows

    a, b, c = sample_rows(1000, 64, 3), sample_rows(1000, 64, 3), sample_rows(1000, 64, 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) == 64 and np.all(np.diff(a) > 0) and a.max() < 1000
    assert np.array_equal(sample_rows(10, 64, 0), np.arange(10))


@pytest.mark.llm
def test_label_mask_covers_exactly_the_prompt_tokens_smollm2():
    from teacher import prompts
    from teacher.finetune_data import IGNORE_INDEX, encode_example
    from teacher.model import fetch_smollm2, load_tokenizer

    tok = load_tokenizer(fetch_smollm2(), padding_side="right")
    history, target = ["Toy Story (1995)", "Heat (1995)"], "Fargo (1996)"
    prompt = prompts.build_prompt(history, prompts.MOVIES)
    full = prompts.build_training_text(history, target, prompts.MOVIES)
    masked = encode_example(tok, prompt, full, 512, train_on_inputs=False)
    open_ = encode_example(tok, prompt, full, 512, train_on_inputs=True)
    ids, labels, n = masked["input_ids"], masked["labels"], masked["n_prompt"]
    assert open_["labels"] == open_["input_ids"] == ids
    assert tok.decode(ids[:n]) == prompt  # the masked tokens spell the prompt, nothing more
    assert tok.decode(ids[n:]) == f'"{target}"' + tok.eos_token  # the trained ones: answer + EOS
    assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
    assert n == len(tok(prompt, add_special_tokens=False)["input_ids"])
    cut = encode_example(tok, prompt, full, 16, train_on_inputs=True)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 16


def test_collate_pads_with_ignore_and_keeps_eos_labels():
    from teacher.finetune_data import IGNORE_INDEX, collate

    eos = 7  # pad id == eos id, as in SmolLM2
    batch = collate([{"input_ids": [1, 2, eos], "labels": [-100, 2, eos], "n_prompt": 1},
                     {"input_ids": [3, eos], "labels": [3, eos], "n_prompt": 1}], pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 2, eos], [3, eos, eos]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, eos], [3, eos, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["n_prompt"].tolist() == [1, 1]


# ---------------------------------------------------------------- the loop on a tiny model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_finetune_lowers_loss_saves_reloads_merges_and_skips(tiny_dataset, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dllm2rec.atomic import read_manifest
    from teacher.finetune import SCHEMA, finetune
    from teacher.lora import merge_lora

    out = tmp_path / "lora"
    cfg = _cfg(tiny_dataset, tiny_base, out)
    finetune(cfg)
    m = read_manifest(out, SCHEMA)
    assert m["valid_loss"][m["best_epoch"]] < m["valid_loss"][0] - 0.05, m["valid_loss"]
    assert m["train_rows"] == 16 and m["valid_rows"] == 8 and m["accumulation_steps"] == 2
    assert m["optimizer_steps"] >= 2 and len(m["valid_loss"]) >= 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left

    # Reload base + adapter; the merged folder must give the same logits.
    ids = torch.randint(0, 300, (2, 20))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    base_logits = _logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    lora_logits = _logits(with_adapter, ids)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-4)  # the adapter does something
    merged_dir = merge_lora(out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, ids), lora_logits, atol=1e-4, rtol=1e-4)
    assert read_manifest(merged_dir)["schema"] == "dllm2rec.teacher_merged/1"
    assert (merged_dir / "tokenizer.json").is_file()

    # Resume-safe: a finished folder is skipped; a different config is refused.
    before = (out / "manifest.json").stat().st_mtime_ns
    finetune(cfg)
    assert (out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="different config"):
        finetune(_cfg(tiny_dataset, tiny_base, out, lr=1e-3))


def test_balanced_sampling_in_the_loop_records_target_coverage(tiny_dataset, tiny_base, tmp_path):
    """``sample_strategy: balanced`` reaches the loop: one prompt per target (the cap binds below
    sample_size), and the manifest's ``train_targets`` counts them; uniform records its own."""
    from dllm2rec.atomic import read_manifest
    from dllm2rec.data.dataset import load_dataset
    from teacher.finetune import SCHEMA, finetune
    from teacher.finetune_data import sample_rows

    targets = load_dataset(tiny_dataset).splits["train"]["target"]
    n_distinct = len(np.unique(targets))
    assert n_distinct < 16  # the fixture's 24 rows cover fewer than 16 of its 12 titles
    out = tmp_path / "balanced"
    finetune(_cfg(tiny_dataset, tiny_base, out, sample_strategy="balanced", max_per_target=1, epochs=2))
    m = read_manifest(out, SCHEMA)
    assert m["train_rows"] == m["train_examples"] == n_distinct
    assert m["train_targets"] == {"distinct_targets": n_distinct, "target_coverage": n_distinct / len(TITLES),
                                  "max_rows_per_target": 1}
    assert m["config"]["sample_strategy"] == "balanced"
    uni = tmp_path / "uniform"
    finetune(_cfg(tiny_dataset, tiny_base, uni, epochs=2))
    u = read_manifest(uni, SCHEMA)
    counts = np.unique(targets[sample_rows(len(targets), 16, 0)], return_counts=True)[1]
    assert u["train_examples"] == 16 and u["train_targets"]["distinct_targets"] == len(counts)
    assert u["train_targets"]["max_rows_per_target"] == counts.max() > 1


def test_answer_only_training_and_cli(tiny_dataset, tiny_base, tmp_path):
    from teacher.cli import run

    out = tmp_path / "lora_answer"
    rc = run(["finetune", f"dataset={tiny_dataset}", f"output_dir={out}", f"base_model={tiny_base}",
              "sample_size=8", "valid_size=4", "epochs=2", "micro_batch_size=4", "effective_batch_size=4",
              "lr=2e-2", "train_on_inputs=false", "progress=false", "max_length=128"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    # With the prompt masked, the trained loss IS the answer-token loss.
    assert m["valid_loss"] == pytest.approx(m["valid_answer_loss"])
    assert m["valid_loss"][m["best_epoch"]] < m["valid_loss"][0]
    assert run(["merge-lora", "--adapter", str(out), "--output", str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
    assert run(["finetune", f"dataset={tmp_path / 'nope'}", f"output_dir={tmp_path / 'x'}",
                f"base_model={tiny_base}"]) == 2  # missing dataset: clear error, exit status 2


def test_trained_position_logits_train_like_the_hf_loss(tiny_dataset, tiny_base, tmp_path):
    """``logits: trained`` (the LM head only where a token is trained) and ``logits: all`` (the HF
    path) run the same answer-only fine-tune: the same losses epoch by epoch."""
    from dllm2rec.atomic import read_manifest
    from teacher.finetune import SCHEMA, finetune

    runs = {}
    for mode in ("trained", "all"):
        out = tmp_path / mode
        finetune(_cfg(tiny_dataset, tiny_base, out, epochs=2, train_on_inputs=False, logits=mode))
        runs[mode] = read_manifest(out, SCHEMA)
    for key in ("valid_loss", "valid_answer_loss", "train_loss"):
        assert runs["trained"][key] == pytest.approx(runs["all"][key], rel=1e-4), key
    assert runs["trained"]["valid_loss"][-1] < runs["trained"]["valid_loss"][0]


def test_bench_compare_logits_pair_times_both_paths(tiny_dataset, tiny_base, tmp_path):
    """`teacher bench --compare --only logits`: both paths run on the same batches, the answer-only
    share of positions is below 1 and the two losses agree."""
    from teacher.bench_compare import _logits_pair

    ft = _cfg(tiny_dataset, tiny_base, tmp_path / "x", train_on_inputs=False)
    n, secs, check, share, dtype = _logits_pair(ft, 8, 1)
    assert 0 < n <= 8 and dtype in ("fp32", "bf16")  # rows whose answer max_length cuts are dropped
    assert list(secs)[0] == "fp32, every position" and list(secs)[-1] == f"{dtype}, trained positions"
    assert len(secs) == (3 if dtype == "bf16" else 2) and all(t > 0 for t in secs.values())
    assert 0 < share < 0.8
    losses = [float(x) for x in check.removeprefix("loss ").split(" / ")]
    assert losses[-1] == pytest.approx(losses[-2], rel=1e-4)  # same precision, same loss
    assert losses[-1] == pytest.approx(losses[0], rel=2e-2)  # bf16 vs fp32: close


def test_bf16_autocast_on_cpu_is_applied_and_trains_like_fp32(tiny_dataset, tiny_base, tmp_path):
    """``mixed_precision: bf16`` (the CPU fine-tune default, issue 16) really runs under bf16
    autocast on CPU (the base model's loss moves by bf16 rounding, not more) and still learns."""
    from accelerate.state import AcceleratorState

    from dllm2rec.atomic import read_manifest
    from teacher.finetune import SCHEMA, finetune

    losses = {}
    for mp in ("no", "bf16"):
        AcceleratorState._reset_state(True)  # one process normally holds one precision for life
        # quoted: a bare `no` is a YAML boolean
        finetune(_cfg(tiny_dataset, tiny_base, tmp_path / mp, mixed_precision=f'"{mp}"', epochs=2))
        losses[mp] = read_manifest(tmp_path / mp, SCHEMA)["valid_loss"]
    AcceleratorState._reset_state(True)
    fp32, bf16 = losses["no"][0], losses["bf16"][0]  # epoch 0: the same un-tuned base, same examples
    assert fp32 != bf16 and abs(fp32 - bf16) < 0.02 * fp32, (fp32, bf16)
    assert min(losses["bf16"][1:]) < bf16 - 0.05


def test_max_seconds_stops_after_one_step_and_still_saves(tiny_dataset, tiny_base, tmp_path):
    from teacher.cli import run

    out = tmp_path / "lora_timed"
    common = [f"dataset={tiny_dataset}", f"base_model={tiny_base}", "sample_size=16", "valid_size=4",
              "epochs=3", "micro_batch_size=4", "effective_batch_size=4", "lr=2e-2", "progress=false",
              "max_length=128"]
    # any budget is exceeded after the first optimizer step: one step, then validation + save
    assert run(["finetune", f"output_dir={out}", "max_seconds=1e-9", *common]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["stopped_by_max_seconds"] is True
    assert m["optimizer_steps"] == 1 and m["train_examples_seen"] == 4 and len(m["valid_loss"]) == 2
    assert (out / "adapter" / "adapter_config.json").is_file()
    untimed = [a for a in common if not a.startswith("epochs=")] + ["epochs=1"]
    assert run(["finetune", f"output_dir={tmp_path / 'untimed'}", *untimed]) == 0
    full = json.loads((tmp_path / "untimed" / "manifest.json").read_text())
    assert full["stopped_by_max_seconds"] is False and full["optimizer_steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "deepspeed"])
def test_two_process_ddp_over_gloo(tiny_dataset, tiny_base, tmp_path, mode):
    """Two real ranks over gloo: DDP (``--multi_gpu`` + ACCELERATE_USE_CPU=1) or DeepSpeed ZeRO-2."""
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
        topo = ["--multi_gpu"]
    else:  # DeepSpeed picks its CPU accelerator itself; --cpu would be refused
        topo = ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "launch/deepspeed_teacher_zero2.json")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *topo, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29533" if mode == "ddp" else "29534", "-m", "teacher", "finetune", f"dataset={tiny_dataset}", f"output_dir={out}", f"base_model={tiny_base}",
           "sample_size=16", "valid_size=8", "epochs=2", "micro_batch_size=4", "effective_batch_size=8",
           "lr=2e-2", "progress=false", "max_length=128"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["accumulation_steps"] == 1
    assert m["valid_loss"][m["best_epoch"]] < m["valid_loss"][0]


@pytest.mark.slow
@pytest.mark.llm
def test_smollm2_few_steps_lowers_validation_loss(tiny_dataset, tmp_path):
    from teacher.finetune import finetune, load_finetune_config

    out = tmp_path / "smollm2"
    cfg = load_finetune_config(None, [f"dataset={tiny_dataset}", f"output_dir={out}", "base_model=smollm2",
                                      "sample_size=8", "valid_size=4", "epochs=2", "micro_batch_size=4",
                                      "effective_batch_size=4", "lr=1e-3", "progress=false", "threads=2"])
    finetune(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["trainable_parameters"] == 460_800  # r=8 on q_proj + v_proj of SmolLM2-135M
    assert m["valid_loss"][m["best_epoch"]] < m["valid_loss"][0]
