"""Fold a fine-tuned LoRA adapter into its base weights: ``python -m teacher merge-lora``.

The merged folder is a plain HF model (+ tokenizer) for vLLM builds without LoRA support; its
``manifest.json`` (schema ``dllm2rec.teacher_merged/1``) names the base, the adapter and the
adapter file's sha256.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest
from dllm2rec.errors import ConfigError
from teacher.finetune import SCHEMA

MERGED_SCHEMA = "dllm2rec.teacher_merged/1"


def merge_lora(adapter: str | Path, output: str | Path, dtype: str = "float32",
               base_model: str | None = None) -> Path:
    """Fold a LoRA adapter into its base weights; save a plain HF folder (model + tokenizer).

    ``adapter`` is a fine-tune folder (with ``manifest.json`` and ``adapter/``) or a bare PEFT
    adapter folder. The base is the one recorded in the fine-tune manifest unless ``base_model``
    is given. The output is written to a temporary folder and renamed; its ``manifest.json``
    names the base, the adapter and the adapter's manifest hash.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from teacher.model import ModelError, load_tokenizer, resolve_base_model

    adapter = Path(adapter)
    run_manifest: dict = {}
    if (adapter / "manifest.json").is_file():
        run_manifest = read_manifest(adapter, SCHEMA)
        adapter_dir = adapter / run_manifest.get("adapter", "adapter")
    else:
        adapter_dir = adapter
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: no PEFT adapter (adapter_config.json) and no fine-tune manifest")
    spec = base_model or run_manifest.get("base_model")
    if not spec:
        spec = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_path = resolve_base_model(spec)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"merge-lora: dtype {dtype!r}; choose float32, bfloat16 or float16")
    # Merge in fp32 (exact W + B A scaling), cast afterwards.
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    # vLLM needs the tokenizer next to the weights; a bare test base may not have one.
    has_tok = any((base_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(base_path) if has_tok else None
    out = Path(output)
    adapter_hash = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_manifest(tmp, {"schema": MERGED_SCHEMA, "base_model": spec, "base_model_path": str(base_path),
                             "adapter": str(adapter_dir.resolve()), "adapter_sha256": adapter_hash,
                             "dtype": dtype, "id_map_hash": run_manifest.get("id_map_hash")})
    return out
