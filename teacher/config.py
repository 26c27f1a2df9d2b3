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
    engine: str = "vllm"  # vllm | hf (the base LLM, last token) | sentence (embed.model, mean pooling)
    model: str = "minilm"  # engine sentence only: "minilm" (all-MiniLM-L6-v2 via pip) or a local encoder folder
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
    # collaborative grounding (teacher/collab.py): dist * (1 + collab) ** -gamma over all items;
    # "none" = plain L2 grounding. popularity | cooc make the teacher carry collaborative information.
    collab: str = "none"
    gamma: float = 0.0  # >= 0; 0 = plain grounding exactly; choose on validation
    collab_dim: int = 64  # cooc: item factors (truncated SVD of the training PPMI matrix)
    collab_neighbours: int = 200  # cooc: items mined by FAISS per row; the others get collab 0


@dataclass
class QueryConfig:
    """What each row is grounded from (teacher/query.py). ``generated`` = BIGRec (LLM-generated
    title); ``history_mean | history_last | history_decay`` = generation-free: a (recency-weighted)
    mean of the row's history item-title embeddings (no generate phase)."""

    kind: str = "generated"
    decay: float = 0.7  # history_decay: weight decay ** age, age 0 = the newest history item


@dataclass
class ConstrainedConfig:
    """``teacher constrained``: beam search over the catalogue-title trie (teacher/trie.py)."""

    k: int = 20  # distinct items per row (the teacher's top_n)
    beam_width: int = 20  # >= k
    length_penalty: float = 0.0  # score = logp / n_branching ** length_penalty (ghost tokens never count)
    batch_prompts: int = 8  # prompts searched together, one model call per step (teacher/beam_batch.py)
    # transformers attention for the search: sdpa | eager. Llama models (SmolLM2) decode with
    # teacher/beam_batch.py's own attention, so this picks the prefill's (level in BENCHMARKS.md
    # run 4; sdpa does not build the L x L matrix); other architectures decode through
    # transformers, where eager was faster for one-token steps in an ad-hoc profile.
    attention: str = "sdpa"


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
    query: QueryConfig = field(default_factory=QueryConfig)
    constrained: ConstrainedConfig = field(default_factory=ConstrainedConfig)


_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16"},
    "generate.engine": {"vllm", "hf"},
    "generate.decoding": {"greedy", "beam"},
    "embed.engine": {"vllm", "hf", "sentence"},
    "embed.store_dtype": {"float32", "float16"},
    "ground.index": {"flat", "ivf", "hnsw"},
    "ground.collab": {"none", "popularity", "cooc"},
    "phase_process": {"subprocess", "inprocess"},
    "constrained.attention": {"eager", "sdpa"},
    "query.kind": {"generated", "history_mean", "history_last", "history_decay"},
}
_POSITIVE = {
    "model.max_model_len", "generate.beam_width", "generate.max_new_tokens", "generate.batch_size",
    "embed.batch_size", "ground.top_n", "ground.batch_size", "ground.nlist", "ground.nprobe",
    "ground.hnsw_m", "ground.ef_search", "ground.recall_sample", "ground.collab_dim", "ground.collab_neighbours",
    "constrained.k", "constrained.beam_width", "constrained.batch_prompts",
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
    if cfg.ground.gamma < 0:
        raise ConfigError(f"{source}: 'ground.gamma' must be >= 0, got {cfg.ground.gamma!r}")
    if not 0.0 < cfg.query.decay <= 1.0:
        raise ConfigError(f"{source}: 'query.decay' must be in (0, 1], got {cfg.query.decay!r}")
    if cfg.constrained.beam_width < cfg.constrained.k or cfg.constrained.length_penalty < 0:
        raise ConfigError(f"{source}: need constrained.beam_width >= constrained.k and length_penalty >= 0")
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
