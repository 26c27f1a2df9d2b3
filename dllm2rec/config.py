"""Typed run configuration: dataclasses loaded from YAML with dotted CLI overrides.

The dataclasses here are the single source of truth for every knob of a student run.
Topology (processes, nodes, DeepSpeed) is NOT part of a run config: it lives in
``accelerate_config.yaml`` and ``launch/``.

Contract:
- ``load_config(path, overrides)`` reads a YAML file, applies ``a.b.c=value`` overrides
  (values parsed as YAML scalars), rejects unknown keys (``ConfigError`` naming the key and
  the file), checks types and ranges, and returns a ``RunConfig``.
- ``dump_config(cfg, path)`` writes the resolved config atomically (it is written next to
  every output so a run can be reproduced from its folder alone).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dllm2rec.errors import ConfigError


@dataclass
class DataConfig:
    path: str = "runs/data/ml-100k"  # a prepared dataset folder (see docs/ARCHITECTURE.md)


@dataclass
class ModelConfig:
    name: str = "sasrec"  # gru4rec | sasrec | caser
    hidden: int = 64
    dropout: float = 0.1
    max_len: int = 10
    num_heads: int = 1  # sasrec
    num_blocks: int = 1  # sasrec
    caser_heights: list[int] = field(default_factory=lambda: [2, 3, 4])
    caser_filters: int = 16
    caser_vertical: int = 1


@dataclass
class LossConfig:
    objective: str = "bce"  # bce | ce | sampled_softmax
    dro_alpha: float = 0.0  # > 0 turns SASRec into DROS
    dro_beta: float = 1.0
    num_sampled: int = 256  # sampled_softmax: shared negatives per batch
    item_chunk: int = 65536  # items per chunk for full-catalogue terms (DRO, CE, top-k)


@dataclass
class RDConfig:
    enabled: bool = False
    variant: str = "official"  # official | paper
    lam: float = 0.8
    k: int = 10
    beta_position: float = 1.0
    gamma_position: float = 0.3
    gamma_confidence: float = 0.5
    gamma_consistency: float = 0.1
    use_position: bool = True
    use_confidence: bool = True
    use_consistency: bool = True
    soft_target_mix: float = 0.5  # ce objective: weight of the teacher distribution vs one-hot


@dataclass
class EDConfig:
    enabled: bool = False
    weight: float = 0.2
    learnable_offset: bool = True  # False: projected LLM embedding only (no ID embedding)


@dataclass
class DistillConfig:
    teacher: str = ""  # teacher artefact folder (project format) or reference tocf/ folder
    # Share of training rows that must have teacher output. 1.0 = all (default, strict). Lower
    # values allow a teacher run over a documented subset (demo); rows without output get no RD.
    min_coverage: float = 1.0
    rd: RDConfig = field(default_factory=RDConfig)
    ed: EDConfig = field(default_factory=EDConfig)


@dataclass
class TrainConfig:
    output_dir: str = "runs/student"
    epochs: int = 200
    batch_size: int = 256  # global batch size, split across processes
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    patience: int = 10
    select_on: str = "valid"  # valid | test (test = reference-code protocol, labelled as such)
    eval_dropout: bool = False  # True = reference-code protocol (dropout on at evaluation)
    eval_batch_size: int = 1024
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # > 0: also checkpoint every N steps inside an epoch (exact mid-epoch resume)
    max_steps_per_epoch: int = 0  # 0 = full pass (a cap is for smoke tests)
    progress: bool = True
    # float32 | bfloat16: dtype of the heavy matrix products (ED projection, catalogue/DRO score pass,
    # evaluation scores; dllm2rec/precision.py). bfloat16 is opt-in: it changes results beyond the
    # fp32 tolerances, and is slower than fp32 on CPUs without AMX / avx512_bf16 (see BENCHMARKS.md).
    matmul_dtype: str = "float32"
    # adam | lazy_adam. lazy_adam (dllm2rec/train/lazy_adam.py): the catalogue tables (item id
    # embedding, output layer) get row-sparse gradients and only the rows a step touched are updated
    # (TF LazyAdam semantics; a different optimiser, not a faster Adam). For large catalogues, where
    # dense [N, H] gradients and Adam over all N rows dominate a step. Several processes: gradients
    # are averaged by distributed.average_gradients instead of DDP; refused under DeepSpeed.
    optimizer: str = "adam"
    # True: the same step with fewer operations (one gather for the target / negative / teacher
    # candidate logits; SASRec's last block only at the read-out position, in training and
    # evaluation). The function is unchanged in exact arithmetic, but fp32 rounding and the dropout
    # draws differ from the default path, so runs are not bit-identical to runs made without it.
    fast_step: bool = False


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    select_metric: str = "ndcg@20"
    mask_history: bool = False  # non-default: exclude history items from the ranking
    # Evaluate a fixed sample of N rows instead of the whole split (0 = every row). For splits too
    # large to rank in full every epoch (10M+ interactions, 1M items): the sample is drawn once by
    # eval.sample_seed, not train.seed, so every seed and variant is selected on the same rows. The
    # metrics then estimate the full split's; the run's protocol label and manifest say so.
    valid_rows: int = 0
    test_rows: int = 0
    sample_seed: int = 0


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    ("model", "name"): {"gru4rec", "sasrec", "caser"},
    ("loss", "objective"): {"bce", "ce", "sampled_softmax"},
    ("distill", "rd", "variant"): {"official", "paper"},
    ("train", "select_on"): {"valid", "test"},
    ("train", "matmul_dtype"): {"float32", "bfloat16"},  # = dllm2rec.precision.MATMUL_DTYPES (no torch import here)
    ("train", "optimizer"): {"adam", "lazy_adam"},
}
_POSITIVE = {
    ("model", "hidden"), ("model", "max_len"), ("model", "num_heads"), ("model", "num_blocks"),
    ("model", "caser_filters"), ("loss", "num_sampled"), ("loss", "item_chunk"),
    ("distill", "rd", "k"), ("train", "batch_size"), ("train", "lr"), ("train", "eval_batch_size"),
    ("train", "epochs"), ("train", "checkpoint_every"), ("distill", "rd", "beta_position"),
    ("loss", "dro_beta"),
}
_NON_NEGATIVE = {
    ("loss", "dro_alpha"), ("distill", "rd", "lam"), ("distill", "ed", "weight"),
    ("distill", "rd", "gamma_position"), ("distill", "rd", "gamma_confidence"),
    ("distill", "rd", "gamma_consistency"), ("train", "weight_decay"), ("train", "patience"),
    ("train", "seed"), ("train", "max_steps_per_epoch"), ("train", "checkpoint_every_steps"), ("model", "caser_vertical"),
    ("eval", "valid_rows"), ("eval", "test_rows"), ("eval", "sample_seed"),
}
_UNIT = {("model", "dropout"), ("distill", "rd", "soft_target_mix"), ("distill", "min_coverage")}


def _build(cls: type, raw: dict, where: str, source: str) -> Any:
    """Recursively build dataclass ``cls`` from ``raw``, rejecting unknown keys and bad types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{source}: unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed under '{where or 'top level'}': {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(hints[f.name], raw[f.name], key, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(inner, v, key, source) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: unsupported type for '{key}'")  # pragma: no cover


def _get(cfg: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        cfg = getattr(cfg, p)
    return cfg


def validate(cfg: RunConfig, source: str = "config") -> RunConfig:
    """Range and cross-field checks. Raises ``ConfigError`` naming the key and the problem."""
    for path, allowed in _CHOICES.items():
        v = _get(cfg, path)
        if v not in allowed:
            raise ConfigError(f"{source}: '{'.'.join(path)}' = {v!r}; choose one of {sorted(allowed)}")
    for path in _POSITIVE:
        if not _get(cfg, path) > 0:
            raise ConfigError(f"{source}: '{'.'.join(path)}' must be > 0, got {_get(cfg, path)!r}")
    for path in _NON_NEGATIVE:
        if _get(cfg, path) < 0:
            raise ConfigError(f"{source}: '{'.'.join(path)}' must be >= 0, got {_get(cfg, path)!r}")
    for path in _UNIT:
        if not 0.0 <= _get(cfg, path) <= 1.0:
            raise ConfigError(f"{source}: '{'.'.join(path)}' must be in [0, 1], got {_get(cfg, path)!r}")
    if not cfg.eval.ks or any(k <= 0 for k in cfg.eval.ks):
        raise ConfigError(f"{source}: 'eval.ks' must be a non-empty list of positive integers")
    metric, _, k = cfg.eval.select_metric.partition("@")
    if metric not in {"ndcg", "hr"} or not k.isdigit() or int(k) not in cfg.eval.ks:
        raise ConfigError(
            f"{source}: 'eval.select_metric' = {cfg.eval.select_metric!r}; expected ndcg@K or hr@K "
            f"with K in eval.ks {cfg.eval.ks}"
        )
    if (cfg.distill.rd.enabled or cfg.distill.ed.enabled) and not cfg.distill.teacher:
        raise ConfigError(f"{source}: distillation is enabled but 'distill.teacher' is empty")
    if any(h <= 0 or h > cfg.model.max_len for h in cfg.model.caser_heights):
        raise ConfigError(f"{source}: 'model.caser_heights' must lie in 1..model.max_len")
    if cfg.model.hidden % cfg.model.num_heads:
        raise ConfigError(f"{source}: 'model.hidden' must be divisible by 'model.num_heads'")
    return cfg


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false (any case) are booleans. PyYAML's YAML 1.1
    also reads yes/no/on/off as booleans, which turned ``mixed_precision=no`` (a documented value
    of a string key) into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (no object construction), booleans only from true/false."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-3'`` -> (['train', 'lr'], 0.001). Values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, _, raw = text.partition("=")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml_load(raw) if raw.strip() else ""
    # YAML reads '1e-3' as a string; accept scientific notation as a float.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{p}' is not a section")
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file safely; ``ConfigError`` naming the file when missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} file not found")
    try:
        return yaml_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:  # e.g. a file cut inside a multi-byte character
        raise ConfigError(f"{p}: truncated or corrupt: not UTF-8 text at byte {exc.start}") from exc


def load_typed(cls: type, path: str | Path | None, overrides: list[str] | None = None) -> tuple[Any, str]:
    """YAML file (or defaults when ``path`` is None) + dotted overrides -> (``cls`` instance, source).

    Shared by every typed config (student runs, teacher phases, fine-tuning); callers validate."""
    source = str(path) if path else "defaults"
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, list(overrides or []))
    return _build(cls, raw, "", source), source


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (or defaults when ``path`` is None) and apply overrides."""
    cfg, source = load_typed(RunConfig, path, overrides)
    return validate(cfg, source)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flat_items(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested config dict -> {("train", "lr"): 0.001, ...} (lists stay values)."""
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_items(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def config_diff(saved: dict, now: dict, ignore: set[tuple] = frozenset(), defaults: dict | None = None) -> list[str]:
    """Dotted keys whose value differs between two config dicts (keys in ``ignore`` skipped).

    ``defaults`` (e.g. ``config_to_dict(RunConfig())``): a key missing from ``saved`` takes its
    default there, so a config written before the key existed (e.g. ``train.matmul_dtype``) is not
    reported as changed while the key keeps its default."""
    a, b = flat_items(saved or {}), flat_items(now or {})
    if defaults:
        a = {**{k: v for k, v in flat_items(defaults).items() if k not in a}, **a}
    return sorted(".".join(k) for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


def dump_config(cfg: Any, path: str | Path) -> None:
    from dllm2rec.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
