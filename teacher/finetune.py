"""BIGRec LoRA fine-tuning of the teacher LLM (``python -m teacher finetune``) and merging.

One plain Accelerate loop: the same code runs single-process on CPU, under
``accelerate launch --multi_gpu`` (DDP, also over gloo on CPU) and under DeepSpeed ZeRO-2
(``launch/deepspeed_teacher_zero2.json``). SPEC section 2 defaults: LoRA r=8, alpha=16,
dropout 0.05 on q_proj/v_proj, effective batch 128, 1,024 sampled training prompts, loss on
prompt and answer (``train_on_inputs=True``).

Training prompts: ``sample_strategy: uniform`` (default) draws ``sample_size`` train rows
uniformly (``teacher.finetune_data.sample_rows``), so frequent targets dominate as they do in the
split; ``balanced`` keeps at most ``max_per_target`` rows per target item, spread evenly over the
targets (``sample_balanced``; fewer than ``sample_size`` rows when the cap binds, logged). The
validation sample is always uniform, so valid losses compare across strategies. Under
``uniform`` the two sampling keys are not part of ``config_identity`` (runs made before they
existed keep their identity).

Output folder (``output_dir``), schema ``dllm2rec.teacher_lora/1``:
- ``adapter/``: PEFT ``save_pretrained`` of the best epoch (lowest validation loss), replaced
  atomically (written to a temp folder, then renamed);
- ``config.yaml``: the resolved ``FinetuneConfig``;
- ``manifest.json`` (last): base model, LoRA hyper-parameters, sample sizes, seed, dataset
  ``id_map_hash``, ``valid_loss`` per epoch (entry 0 = the un-tuned base), ``best_epoch``,
  ``train_targets`` (distinct target items among the training examples, their share of the
  catalogue = target coverage, the most rows one target has), timings. A finished folder with
  the same config is skipped (resume-safe); a half-written one is redone.

Merging an adapter into the base weights lives in ``teacher.lora``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dllm2rec.atomic import atomic_dir, atomic_write_text, read_manifest, write_manifest
from dllm2rec.config import load_typed
from dllm2rec.errors import ConfigError, ManifestError, TrainingError
from teacher.lm_loss import LOGITS_MODES
from teacher.precision import resolve_mixed_precision

SCHEMA = "dllm2rec.teacher_lora/1"


@dataclass
class FinetuneConfig:
    dataset: str = "runs/data/ml-100k"  # prepared dataset folder (schema dllm2rec.dataset/1)
    output_dir: str = "runs/teacher/ml-100k/lora"
    base_model: str = "smollm2"  # "smollm2" (cached conversion) or a local HF folder
    sample_size: int = 1024  # training prompts sampled from the train split (BIGRec: 1,024)
    sample_strategy: str = "uniform"  # uniform | balanced (<= max_per_target prompts per target item)
    max_per_target: int = 1  # balanced only: cap on training prompts that share one target item
    valid_size: int = 200  # validation prompts (valid split) for the per-epoch loss
    seed: int = 0
    max_length: int = 256  # tokens per example (prompt + answer + EOS), truncated on the right
    train_on_inputs: bool = True  # False: loss on the answer tokens only
    # trained: the LM head and log-softmax only at positions that predict a trained token (same loss,
    # far less work with train_on_inputs: false; teacher/lm_loss.py) | all: at every position (HF default)
    logits: str = "trained"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # linear warm-up over this share of optimizer steps, then linear decay
    epochs: int = 3
    micro_batch_size: int = 8  # examples per process per forward pass
    effective_batch_size: int = 128  # examples per optimizer step over all processes
    patience: int = 2  # epochs without a lower validation loss before stopping
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "no"  # no | bf16 (GPU, or CPU autocast) | auto (bf16 where the hardware has it)
    threads: int = 0  # torch threads per process on CPU (0 = leave as is)
    max_seconds: float = 0.0  # > 0: stop training after this much wall time (at a step boundary), then validate + save
    progress: bool = True


_POSITIVE = ("sample_size", "max_per_target", "valid_size", "max_length", "lora_r", "lora_alpha", "lr",
             "epochs", "micro_batch_size", "effective_batch_size")
_NON_NEGATIVE = ("seed", "weight_decay", "patience", "max_grad_norm", "threads", "max_seconds")
# Fields that do not change the result: a finished run is reused even if they differ.
_NOT_IDENTITY = ("output_dir", "progress", "threads", "logits")  # logits: the same loss either way
SAMPLE_STRATEGIES = ("uniform", "balanced")


def validate(cfg: FinetuneConfig, source: str = "config") -> FinetuneConfig:
    """Range checks; raises ``ConfigError`` naming the key, the value and the file."""
    for name in _POSITIVE:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{source}: '{name}' must be > 0, got {getattr(cfg, name)!r}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{source}: '{name}' must be >= 0, got {getattr(cfg, name)!r}")
    for name in ("lora_dropout", "warmup_ratio"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{source}: '{name}' must be in [0, 1), got {getattr(cfg, name)!r}")
    if cfg.sample_strategy not in SAMPLE_STRATEGIES:
        raise ConfigError(f"{source}: 'sample_strategy' = {cfg.sample_strategy!r}; choose one of {SAMPLE_STRATEGIES}")
    if cfg.logits not in LOGITS_MODES:
        raise ConfigError(f"{source}: 'logits' = {cfg.logits!r}; choose one of {LOGITS_MODES}")
    if cfg.mixed_precision not in ("no", "bf16", "auto"):
        raise ConfigError(f"{source}: 'mixed_precision' = {cfg.mixed_precision!r}; choose 'no', 'bf16' or 'auto'")
    if not cfg.target_modules or any(not m for m in cfg.target_modules):
        raise ConfigError(f"{source}: 'target_modules' must be a non-empty list of module names")
    if cfg.effective_batch_size % cfg.micro_batch_size:
        raise ConfigError(
            f"{source}: 'effective_batch_size' ({cfg.effective_batch_size}) must be a multiple of "
            f"'micro_batch_size' ({cfg.micro_batch_size})"
        )
    if not cfg.dataset or not cfg.output_dir:
        raise ConfigError(f"{source}: 'dataset' and 'output_dir' must be set")
    return cfg


def load_finetune_config(path: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """YAML file (or defaults) + ``key=value`` overrides -> validated ``FinetuneConfig``."""
    cfg, source = load_typed(FinetuneConfig, path, overrides)
    return validate(cfg, source)


def config_identity(cfg: FinetuneConfig) -> str:
    """sha256 over the fields that determine the adapter (not output_dir / progress / threads)."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY}
    if cfg.sample_strategy == "uniform":  # keeps the identity of runs made before these keys existed
        del d["sample_strategy"], d["max_per_target"]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def accumulation_steps(cfg: FinetuneConfig, world: int) -> int:
    """Micro-batches per optimizer step so that micro * world * steps == effective batch."""
    per_step = cfg.micro_batch_size * world
    if cfg.effective_batch_size % per_step:
        raise ConfigError(
            f"effective_batch_size {cfg.effective_batch_size} is not a multiple of "
            f"micro_batch_size {cfg.micro_batch_size} x {world} processes"
        )
    return cfg.effective_batch_size // per_step


def is_done(cfg: FinetuneConfig) -> bool:
    """True when ``output_dir`` holds a complete fine-tune of this exact config."""
    out = Path(cfg.output_dir)
    try:
        manifest = read_manifest(out, SCHEMA)
    except ManifestError:
        return False
    if manifest.get("config_identity") != config_identity(cfg):
        raise ConfigError(
            f"{out}: holds a finished fine-tune with a different config; choose another "
            f"output_dir or pass --force to overwrite it"
        )
    return (out / "adapter" / "adapter_config.json").is_file()


def _encode_split(cfg, dataset, tokenizer, split: str, size: int, seed: int, balanced: bool = False):
    """(examples, sampled row indices); each example carries its dataset ``row``."""
    from teacher.finetune_data import encode_example, sample_balanced, sample_rows, split_texts

    targets = dataset.splits[split]["target"]
    rows = (sample_balanced(targets, size, cfg.max_per_target, seed) if balanced
            else sample_rows(len(targets), size, seed))
    examples = []
    for row, (prompt, full) in zip(rows, split_texts(dataset, split, rows)):
        ex = encode_example(tokenizer, prompt, full, cfg.max_length, cfg.train_on_inputs)
        if any(t != -100 for t in ex["labels"]):  # an answer cut off by truncation teaches nothing
            examples.append({**ex, "row": int(row)})
    return examples, rows


def loss_sums(model, batch, logits: str = "trained") -> "torch.Tensor":
    """Per-example [loss sum, label tokens, answer loss sum, answer tokens]: Float[B, 4].

    Label tokens are the trained ones (``labels != -100``); answer tokens are those after the
    first ``n_prompt`` positions, i.e. the quoted title + EOS whatever ``train_on_inputs`` is.
    """
    import torch

    from teacher.lm_loss import token_losses

    tok, nxt, pos = token_losses(model, batch, logits)  # [B, P]; token pos+1 predicted at pos
    valid = (nxt != -100).float()
    answer = valid * ((pos + 1)[None, :] >= batch["n_prompt"][:, None]).float()
    return torch.stack([(tok * valid).sum(1), valid.sum(1), (tok * answer).sum(1), answer.sum(1)], 1)


def validation_loss(model, loader, accelerator, logits: str = "trained") -> tuple[float, float]:
    """(token-weighted mean loss, answer-only mean loss) over the whole validation sample.

    Exact across processes: ``gather_for_metrics`` drops the duplicates padding the last batch.
    """
    import torch

    model.eval()
    total = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            sums = accelerator.gather_for_metrics(loss_sums(model, batch, logits))
            total += sums.double().sum(0).cpu()
    model.train()
    return float(total[0] / total[1].clamp_min(1)), float(total[2] / total[3].clamp_min(1))


def _save_adapter(model, out: Path) -> None:
    with atomic_dir(out / "adapter") as tmp:
        model.save_pretrained(str(tmp))


def finetune(cfg: FinetuneConfig, force: bool = False) -> Path:
    """Run (or skip, when already done) the LoRA fine-tune described by ``cfg``; returns output_dir."""
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import DistributedType, set_seed
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from dllm2rec.data.dataset import load_dataset
    from teacher.finetune_data import collate, target_coverage
    from teacher.lm_loss import mean_loss
    from teacher.model import load_tokenizer, resolve_base_model

    out = Path(cfg.output_dir)
    if not force and is_done(cfg):
        print(f"finetune: {out} is complete for this config; skipping")
        return out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = accumulation_steps(cfg, world)
    # CPU multi-process (DDP or DeepSpeed) needs gloo named explicitly (PLATFORM.md); a single
    # process must not get it, or accelerate looks for a process group that was never made.
    use_gloo = world > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if use_gloo else []
    precision = resolve_mixed_precision(cfg.mixed_precision)  # teacher/precision.py: auto -> per host
    accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision=precision, kwargs_handlers=handlers)
    if accelerator.num_processes != world:
        raise TrainingError(
            f"accelerate started {accelerator.num_processes} process(es) but WORLD_SIZE={world}; on CPU "
            "launch with --multi_gpu and ACCELERATE_USE_CPU=1 (see docs/PLATFORM notes)"
        )
    set_seed(cfg.seed)
    started = time.time()

    base_path = resolve_base_model(cfg.base_model)
    dataset = load_dataset(cfg.dataset)
    tokenizer = load_tokenizer(base_path, padding_side="right")
    balanced = cfg.sample_strategy == "balanced"
    train_ex, train_rows = _encode_split(cfg, dataset, tokenizer, "train", cfg.sample_size, cfg.seed, balanced)
    if balanced and len(train_rows) < cfg.sample_size and accelerator.is_main_process:
        print(f"finetune: max_per_target={cfg.max_per_target} leaves {len(train_rows)} of the requested "
              f"{cfg.sample_size} training prompts; training on those")
    train_targets = target_coverage(dataset.splits["train"]["target"][[e["row"] for e in train_ex]],
                                    len(dataset.titles))
    valid_ex, valid_rows = _encode_split(cfg, dataset, tokenizer, "valid", cfg.valid_size, cfg.seed + 1)
    if not train_ex or not valid_ex:
        raise TrainingError(f"{cfg.dataset}: no usable training/validation examples at max_length {cfg.max_length}")

    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a target module the architecture does not have
        raise ConfigError(f"target_modules {cfg.target_modules}: {exc}") from exc
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    pad = int(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_ex, batch_size=cfg.micro_batch_size, shuffle=True, generator=gen,
                              collate_fn=lambda b: collate(b, pad))
    valid_loader = DataLoader(valid_ex, batch_size=cfg.micro_batch_size, shuffle=False,
                              collate_fn=lambda b: collate(b, pad))
    params = [p for p in model.parameters() if p.requires_grad]
    raw_optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, train_loader, valid_loader = accelerator.prepare(model, raw_optimizer, train_loader,
                                                                       valid_loader)

    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total_steps)

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    # Not passed to prepare(): we step it once per optimizer step ourselves (prepare() would
    # step it once per process). It edits the torch optimizer's param groups, which the DDP
    # wrapper and DeepSpeed's ZeRO optimizer both keep using.
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer, lr_factor)

    first = validation_loss(model, valid_loader, accelerator, cfg.logits)  # epoch 0 = the un-tuned base
    valid_losses, answer_losses = [first[0]], [first[1]]
    train_losses: list[float] = []
    best, best_epoch, bad_epochs, opt_steps, step_time = valid_losses[0], 0, 0, 0, 0.0
    main = accelerator.is_main_process
    train_start, out_of_time = time.time(), False
    if main:
        print(f"finetune: {len(train_ex)} train / {len(valid_ex)} valid examples, {world} process(es), "
              f"accumulation {accum}, {trainable:,} trainable parameters; valid loss before: {best:.4f} "
              f"(answer tokens {answer_losses[0]:.4f}); {cfg.sample_strategy} sample: "
              f"{train_targets['distinct_targets']} distinct targets ({train_targets['target_coverage']:.1%} "
              f"of {len(dataset.titles)} items, at most {train_targets['max_rows_per_target']} rows each)")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        run_sum, run_n = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not (cfg.progress and main))
        t0 = time.time()
        for batch in bar:
            with accelerator.accumulate(model):
                loss = mean_loss(model, batch, cfg.logits)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite training loss {loss.item()} at epoch {epoch}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if cfg.max_grad_norm and accelerator.distributed_type != DistributedType.DEEPSPEED:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                scheduler.step()
                opt_steps += 1
            run_sum, run_n = run_sum + loss.item(), run_n + 1
            bar.set_postfix(loss=f"{run_sum / run_n:.4f}")
            if cfg.max_seconds and accelerator.sync_gradients:
                # a wall-time budget (job time limits); every rank must stop at the same step
                late = torch.tensor([float(time.time() - train_start > cfg.max_seconds)], device=accelerator.device)
                if accelerator.reduce(late, "max").item() > 0:
                    out_of_time = True
                    break
        step_time += time.time() - t0
        train_losses.append(float(accelerator.reduce(torch.tensor(run_sum / max(1, run_n)), "mean")))
        vl, al = validation_loss(model, valid_loader, accelerator, cfg.logits)
        valid_losses.append(vl)
        answer_losses.append(al)
        if main:
            print(f"finetune: epoch {epoch} train loss {train_losses[-1]:.4f} valid loss {vl:.4f} "
                  f"(answer tokens {al:.4f})")
        if valid_losses[-1] < best:
            best, best_epoch, bad_epochs = valid_losses[-1], epoch, 0
            accelerator.wait_for_everyone()
            if main:
                _save_adapter(accelerator.unwrap_model(model), out)
        else:
            bad_epochs += 1
            if bad_epochs > cfg.patience:
                break
        if out_of_time:
            if main:
                print(f"finetune: max_seconds={cfg.max_seconds:g} reached after {opt_steps} optimizer steps; stopping")
            break
    accelerator.wait_for_everyone()
    if best_epoch == 0:  # every rank sees the same losses, so every rank stops here
        raise TrainingError(
            f"validation loss never fell below the base model's {valid_losses[0]:.4f}; "
            "no adapter saved (try another lr or more epochs)"
        )
    if main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        write_manifest(out, {
            "schema": SCHEMA,
            "base_model": cfg.base_model,
            "base_model_path": str(base_path),
            "adapter": "adapter",
            "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                     "target_modules": list(cfg.target_modules)},
            "config": dataclasses.asdict(cfg),
            "config_identity": config_identity(cfg),
            "dataset": str(cfg.dataset),
            "id_map_hash": dataset.manifest.get("id_map_hash"),
            "train_rows": int(len(train_rows)), "train_examples": len(train_ex),
            "valid_rows": int(len(valid_rows)), "valid_examples": len(valid_ex),
            "train_rows_sha256": hashlib.sha256(train_rows.tobytes()).hexdigest(),
            "train_targets": train_targets,
            "world_size": world, "accumulation_steps": accum, "optimizer_steps": opt_steps, "mixed_precision": precision,
            "trainable_parameters": int(trainable),
            "train_loss": train_losses, "valid_loss": valid_losses, "valid_answer_loss": answer_losses,
            "best_epoch": best_epoch,
            "best_valid_loss": best,
            "stopped_by_max_seconds": out_of_time,
            "train_examples_seen": int(opt_steps * cfg.effective_batch_size),
            "seconds_per_optimizer_step": step_time / max(1, opt_steps),
            "wall_seconds": time.time() - started,
        })
        print(f"finetune: best epoch {best_epoch}, valid loss {valid_losses[0]:.4f} -> {best:.4f} "
              f"(answer tokens {answer_losses[0]:.4f} -> {answer_losses[best_epoch]:.4f}); "
              f"{step_time / max(1, opt_steps):.1f} s per optimizer step; saved {out}")
    accelerator.wait_for_everyone()
    return out
