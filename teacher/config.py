"""Typed teacher-inference config: YAML (launch/configs/teacher_*.yaml) + dotted overrides.

Reuses the student config machinery (``dllm2rec.config.load_typed``): unknown
keys and wrong types raise ``ConfigError`` naming the key and the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from dllm2rec.config import load_typed
from dllm2rec.errors import ConfigError


@dataclass
class ModelConfig:
    base: str = "smollm2"  # "smollm2" (fetched + converted, cached) or a local HF folder
    adapter: str = ""  # PEFT LoRA folder or merged model folder; used for generation only
    dtype: str = "float32"  # engine compute dtype: float32 | bfloat16 | float16
    max_model_len: int = 2048


@dataclass
class GenerateConfig:
    engine: str = "vllm"  # vllm | hf (transformers reference)
    decoding: str = "greedy"  # greedy | beam (best of beam_width kept, as BIGRec)
    beam_width: int = 4
    max_new_tokens: int = 32
    batch_size: int = 64  # prompts per engine call (progress granularity; vLLM batches inside)
    threads: int = 2  # OMP threads on CPU (0 = leave as is)


@dataclass
class EmbedConfig:
    engine: str = "vllm"  # vllm | hf
    batch_size: int = 64
    store_dtype: str = "float32"  # dtype of item_embeddings.safetensors: float32 | float16
    threads: int = 2


@dataclass
class GroundConfig:
    index: str = "flat"  # flat (exact IndexFlatL2) | ivf | hnsw
    top_n: int = 50
    batch_size: int = 1024  # queries per FAISS search call
    nlist: int = 64  # ivf
    nprobe: int = 16  # ivf
    hnsw_m: int = 32  # hnsw
    ef_search: int = 128  # hnsw
    recall_sample: int = 256  # approximate indexes: queries checked against exact search
    min_recall: float = 0.0  # > 0: fail if recall@top_n of an approximate index is lower
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])


@dataclass
class SplitLimits:
    """Rows per split the teacher processes (0 = fall back to ``limit``). The first rows of a
    split in its time order are taken, so a subset is a documented, reproducible prefix."""

    train: int = 0
    valid: int = 0
    test: int = 0


@dataclass
class TeacherConfig:
    dataset: str = "runs/data/ml-100k"  # dataset folder (schema dllm2rec.dataset/1)
    output_dir: str = "runs/teacher/ml-100k"  # final teacher folder; shards under <output_dir>/work
    splits: list[str] = field(default_factory=lambda: ["train", "valid", "test"])
    limit: int = 0  # > 0: only the first `limit` rows of each split (smoke tests)
    limits: SplitLimits = field(default_factory=SplitLimits)  # per-split override of `limit`
    seed: int = 0
    phase_process: str = "subprocess"  # `teacher run`: subprocess | inprocess (engines per phase)
    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ground: GroundConfig = field(default_factory=GroundConfig)


_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16"},
    "generate.engine": {"vllm", "hf"},
    "generate.decoding": {"greedy", "beam"},
    "embed.engine": {"vllm", "hf"},
    "embed.store_dtype": {"float32", "float16"},
    "ground.index": {"flat", "ivf", "hnsw"},
    "phase_process": {"subprocess", "inprocess"},
}
_POSITIVE = {
    "model.max_model_len", "generate.beam_width", "generate.max_new_tokens", "generate.batch_size",
    "embed.batch_size", "ground.top_n", "ground.batch_size", "ground.nlist", "ground.nprobe",
    "ground.hnsw_m", "ground.ef_search", "ground.recall_sample",
}


def _get(cfg, dotted: str):
    for p in dotted.split("."):
        cfg = getattr(cfg, p)
    return cfg


def validate(cfg: TeacherConfig, source: str = "config") -> TeacherConfig:
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{source}: '{key}' = {_get(cfg, key)!r}; choose one of {sorted(allowed)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {_get(cfg, key)!r}")
    for key in ("limit", "limits.train", "limits.valid", "limits.test", "generate.threads", "embed.threads"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0, got {_get(cfg, key)!r}")
    if not 0.0 <= cfg.ground.min_recall <= 1.0:
        raise ConfigError(f"{source}: 'ground.min_recall' must be in [0, 1]")
    bad = [s for s in cfg.splits if s not in ("train", "valid", "test")]
    if not cfg.splits or bad or len(set(cfg.splits)) != len(cfg.splits):
        raise ConfigError(f"{source}: 'splits' must be distinct names from train/valid/test, got {cfg.splits}")
    if not cfg.ground.ks or any(k <= 0 for k in cfg.ground.ks):
        raise ConfigError(f"{source}: 'ground.ks' must be a non-empty list of positive integers")
    return cfg


def split_limits(cfg: TeacherConfig) -> dict[str, int]:
    """Effective row limit per split (0 = all rows)."""
    return {s: getattr(cfg.limits, s) or cfg.limit for s in ("train", "valid", "test")}


def load_teacher_config(path: str | Path | None, overrides: list[str] | None = None) -> TeacherConfig:
    """Read a teacher YAML (or defaults when ``path`` is None), apply ``a.b=value`` overrides."""
    cfg, source = load_typed(TeacherConfig, path, overrides)
    return validate(cfg, source)
