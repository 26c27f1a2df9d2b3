"""Student training: ``python -m dllm2rec train --config launch/configs/<run>.yaml [key=value ...] [--resume]``.

One epoch = one shuffled pass (order = f(seed, epoch), see ``dllm2rec.train.batches``). One step:
forward -> named losses (``dllm2rec.train.objective``) -> finite check on every rank -> backward ->
optimizer step -> log. After each epoch: validation (full ranking), early stopping on the
selection metric (valid ndcg@20, patience 10), test metrics at each new best epoch,
``metrics.jsonl``, TensorBoard scalars, ``best/model.safetensors``, ``checkpoints/last``.
At the end ``results.json`` and the run ``manifest.json``.

Run the same code under ``accelerate launch`` (DDP over gloo/NCCL, or DeepSpeed ZeRO-1/2): the
global batch ``train.batch_size`` is split across processes; see launch/ and docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from dllm2rec.atomic import atomic_write_json, atomic_write_text, restore_interrupted_swap, write_manifest
from dllm2rec.train.batches import epoch_order, global_batch, make_batch, step_seed, steps_per_epoch
from dllm2rec.config import RunConfig, config_to_dict, load_config
from dllm2rec.errors import ConfigError, TrainingError
from dllm2rec.eval.protocol import protocol_label
from dllm2rec.train.inputs import Inputs, load_inputs

RUN_SCHEMA = "dllm2rec.run/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (launch/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 distill.rd.lam=0.5")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/last if present "
                        "(refused when the config or the dataset/teacher differ from the checkpoint's)")
    parser.add_argument("--allow-change", nargs="+", default=[], metavar="KEY",
                        help="with --resume: keys that may differ from the checkpoint's config (train.epochs, "
                             "train.patience, train.checkpoint_every, train.checkpoint_every_steps)")


def run(args: argparse.Namespace) -> int:
    train(load_config(args.config, args.overrides), resume=args.resume, allow_change=tuple(args.allow_change))
    return 0


def make_optimizer(module: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam (``train.optimizer=adam``) or ``LazyAdam`` (``lazy_adam``: row-wise updates for the
    catalogue tables' sparse gradients); the fused kernel for dense parameters where supported
    (one pass over all parameters, ~5x faster on CPU)."""
    from dllm2rec.train.lazy_adam import LazyAdam

    kind = LazyAdam if cfg.train.optimizer == "lazy_adam" else torch.optim.Adam
    kw = dict(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    try:
        return kind(module.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError):
        return kind(module.parameters(), **kw)


def fresh_state() -> dict:
    return {"epoch": 0, "step": 0, "global_step": 0, "loss_sums": {}, "loss_steps": 0,
            "best_value": None, "best_epoch": None, "bad_epochs": 0, "best_valid": None,
            "best_test": None, "history": [], "stopped": None}


def _device_table(table, device):
    return None if table is None else table.to(device)


def train(cfg: RunConfig, resume: bool = False, allow_change: tuple[str, ...] = ()) -> dict:
    """Train one student; returns the results dict (also written to ``results.json``).

    ``resume``: continue ``checkpoints/last`` if present, only when its config and input hashes
    equal this run's except the ``allow_change`` keys (``checkpoint.check_resume``)."""
    from tqdm import tqdm

    from dllm2rec.train import checkpoint as ckpt
    from dllm2rec.train.distributed import (all_finite, average_gradients, barrier, configure_deepspeed_batch,
                                      gather_objects, is_deepspeed, is_main, make_accelerator, mean_across, shard)
    from dllm2rec.eval.evaluate import evaluate_split
    from dllm2rec.train.objective import Encoder, StepObjective

    ckpt.check_allowed(allow_change)
    out = Path(cfg.train.output_dir)
    accelerator = make_accelerator()
    world, rank, main = accelerator.num_processes, accelerator.process_index, is_main(accelerator)
    if cfg.train.optimizer == "lazy_adam" and is_deepspeed(accelerator):
        # DeepSpeed's ZeRO partitions dense gradients and optimizer states; it has no sparse path.
        raise ConfigError("train.optimizer=lazy_adam does not run under DeepSpeed; use plain multi-process "
                          "launches (launch/train_cpu.sh) or train.optimizer=adam")
    # lazy_adam with several processes: no DDP wrapper (its buckets are dense); gradients are
    # averaged by distributed.average_gradients after backward, sparse ones as rows.
    manual_sync = cfg.train.optimizer == "lazy_adam" and world > 1
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is not divisible by the {world} processes")
    inputs = load_inputs(cfg)
    student, splits = inputs.student, inputs.splits
    n_rows = len(splits["train"])
    n_steps = steps_per_epoch(n_rows, cfg.train.batch_size, world, cfg.train.max_steps_per_epoch)
    if n_steps == 0:  # refused before anything is written to the run folder
        raise ConfigError(f"{cfg.data.path}: {n_rows} training rows give no batch")
    objective = StepObjective(cfg, inputs.dataset.n_items, splits["train"].target, inputs.teacher)
    encoder = Encoder(student, objective.mm_dtype)
    optimizer = make_optimizer(encoder, cfg)
    configure_deepspeed_batch(accelerator, cfg.train.batch_size // world, cfg.train.batch_size)
    if manual_sync:
        encoder = encoder.to(accelerator.device)
        optimizer = accelerator.prepare(optimizer)
    else:
        encoder, optimizer = accelerator.prepare(encoder, optimizer)
    device = accelerator.device
    objective.llm_table = _device_table(objective.llm_table, device)
    config_text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    state = fresh_state()
    inputs_digest = ckpt.input_digests(inputs.dataset, inputs.teacher)
    last_dir = out / "checkpoints" / "last"
    if resume:
        if main:  # a checkpoint swap cut by a crash between its two renames: the previous one comes back
            restore_interrupted_swap(last_dir)
        barrier(accelerator)
    if resume and (last_dir / "manifest.json").is_file():
        saved = ckpt.load_checkpoint(last_dir)
        ckpt.check_resume(last_dir, saved, config_to_dict(cfg), inputs_digest, allow_change)
        state = _restore(saved, last_dir, accelerator, student, optimizer, world, rank)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_text)
        _write_metrics(out, state["history"])
    writer = _tensorboard(out) if main else None
    eval_kw = dict(chunk=cfg.loss.item_chunk, batch_size=cfg.train.eval_batch_size, mask_history=cfg.eval.mask_history,
                   llm_table=objective.llm_table, dropout=cfg.train.eval_dropout, seed=cfg.train.seed,
                   matmul_dtype=objective.mm_dtype, fused=cfg.train.fast_step)
    every = cfg.train.checkpoint_every_steps

    def save(position_state):
        rng = gather_objects(accelerator, ckpt.rng_state())
        opt_state = optimizer.state_dict()
        if is_deepspeed(accelerator):
            opt_state = gather_objects(accelerator, opt_state)
        if main:
            ckpt.save_checkpoint(last_dir, model_state=student.state_dict(), optimizer_state=opt_state,
                                 rng_states=rng, state=position_state, config_text=config_text, inputs=inputs_digest)
        barrier(accelerator)

    # One-off kernel compilation (train.fast_step) before the clock of the first epoch starts.
    order0 = epoch_order(cfg.train.seed, 0, n_rows)
    compile_seconds = objective.prepare({len(shard(global_batch(order0, s, cfg.train.batch_size), rank, world))
                                         for s in (0, n_steps - 1)}, device)
    t_start = time.time()
    while state["epoch"] < cfg.train.epochs and state["stopped"] is None:
        epoch = state["epoch"]
        order = epoch_order(cfg.train.seed, epoch, n_rows)
        encoder.train()
        t_epoch = time.time()
        bar = tqdm(range(state["step"], n_steps), disable=not (main and cfg.train.progress),
                   desc=f"epoch {epoch}", leave=False)
        for step in bar:
            seed = step_seed(cfg.train.seed, epoch, step, rank)
            torch.manual_seed(seed)  # dropout of this step: a function of (seed, epoch, step, rank)
            gen = torch.Generator(device=device).manual_seed(seed)
            rows = shard(global_batch(order, step, cfg.train.batch_size), rank, world)
            batch = make_batch(splits["train"], rows, inputs.teacher, objective.rd_k, False, device)
            terms = objective(encoder, student, batch, gen)
            loss = sum(terms.values())
            if not all_finite(accelerator, loss.detach()):
                raise TrainingError(
                    f"non-finite loss at epoch {epoch} step {step} ({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in terms.items())}); "
                    f"stopped, the last good checkpoint is kept in {last_dir}")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if manual_sync:
                average_gradients(accelerator, encoder.parameters())
            optimizer.step()
            for k, v in terms.items():
                state["loss_sums"][k] = state["loss_sums"].get(k, 0.0) + float(v.detach())
            state["loss_sums"]["loss"] = state["loss_sums"].get("loss", 0.0) + float(loss.detach())
            state["loss_steps"] += 1
            state["step"] = step + 1
            state["global_step"] += 1
            if main and cfg.train.progress:
                bar.set_postfix(loss=f"{float(loss):.4f}")
            if every and state["step"] % every == 0 and state["step"] < n_steps:
                save(state)
        bar.close()
        train_seconds = time.time() - t_epoch
        names = sorted(state["loss_sums"])
        local = torch.tensor([state["loss_sums"][k] / max(state["loss_steps"], 1) for k in names], device=device)
        epoch_losses = dict(zip(names, mean_across(accelerator, local).tolist()))
        record = _end_of_epoch(cfg, state, epoch, epoch_losses, train_seconds, student, splits, accelerator, eval_kw,
                               evaluate_split, out, main)
        if writer is not None:
            for k, v in record["losses"].items():
                writer.add_scalar(f"loss/{k}", v, epoch)
            for split in ("valid", "test"):
                for k, v in (record.get(split) or {}).items():
                    writer.add_scalar(f"{split}/{k}", v, epoch)
            writer.flush()
        state.update(epoch=epoch + 1, step=0, loss_sums={}, loss_steps=0)
        if cfg.train.patience and state["bad_epochs"] >= cfg.train.patience:
            state["stopped"] = f"early stop: no {cfg.eval.select_metric} gain on {cfg.train.select_on} for {cfg.train.patience} epochs"
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or state["stopped"] or state["epoch"] >= cfg.train.epochs:
            save(state)
    if writer is not None:
        writer.close()
    digests = gather_objects(accelerator, _param_digest(student))
    results = {
        "protocol": protocol_label(cfg), "select_on": cfg.train.select_on, "select_metric": cfg.eval.select_metric,
        "best_epoch": state["best_epoch"], "valid": state["best_valid"], "test": state["best_test"],
        "eval_rows": {name: len(splits[name]) for name in ("valid", "test")},
        "epochs_run": state["epoch"], "stopped": state["stopped"] or "max epochs reached",
        "world_size": world, "seconds_this_process": round(time.time() - t_start, 3),
        "compile_seconds": round(compile_seconds, 3),
        "param_digest": digests[0], "params_identical_across_ranks": len(set(digests)) == 1,
    }
    if main:
        atomic_write_json(out / "results.json", results)
        write_manifest(out, _run_manifest(cfg, inputs, state))
    barrier(accelerator)
    return results


def _end_of_epoch(cfg, state, epoch, epoch_losses, train_seconds, student, splits, accelerator, eval_kw,
                  evaluate_split, out: Path, main: bool) -> dict:
    """Evaluate, update early stopping, write best weights and metrics.jsonl; returns the epoch record."""
    from safetensors.torch import save_file

    from dllm2rec.atomic import atomic_path

    ks = cfg.eval.ks
    t0 = time.time()
    valid = evaluate_split(student, splits["valid"], accelerator, ks, **eval_kw)
    test = evaluate_split(student, splits["test"], accelerator, ks, **eval_kw) if cfg.train.select_on == "test" else None
    value = (valid if cfg.train.select_on == "valid" else test)[cfg.eval.select_metric]
    improved = state["best_value"] is None or value > state["best_value"]
    if improved:
        if test is None:
            test = evaluate_split(student, splits["test"], accelerator, ks, **eval_kw)
        state.update(best_value=value, best_epoch=epoch, bad_epochs=0, best_valid=valid, best_test=test)
        if main:
            with atomic_path(out / "best" / "model.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp))
    else:
        state["bad_epochs"] += 1
    record = {"epoch": epoch, "losses": epoch_losses, "valid": valid, "test": test, "improved": improved,
              "train_seconds": round(train_seconds, 3), "eval_seconds": round(time.time() - t0, 3)}
    state["history"].append(record)
    if main:
        _write_metrics(out, state["history"])
    return record


def _write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl is rewritten whole from the checkpointed history, so a resumed run never
    repeats or loses an epoch line."""
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))


def _param_digest(student: torch.nn.Module) -> str:
    """sha256 of all weights: equal on every rank iff the processes trained one synchronised model."""
    import hashlib

    h = hashlib.sha256()
    for name, v in sorted(student.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tb"))


def _restore(saved: dict, last_dir: Path, accelerator, student, optimizer, world: int, rank: int) -> dict:
    from dllm2rec.train import checkpoint as ckpt

    if saved["world_size"] != world:
        raise TrainingError(f"{last_dir}: saved with {saved['world_size']} processes, resuming with {world}; "
                            "resume with the same number of processes (the data shards and RNG streams depend on it)")
    student.load_state_dict(saved["model"])
    # DeepSpeed ZeRO takes the list of every rank's partition and picks its own.
    optimizer.load_state_dict(saved["optimizer"])
    ckpt.set_rng_state(saved["rng"][rank])
    return saved["state"]


def _run_manifest(cfg: RunConfig, inputs: Inputs, state: dict) -> dict:
    ds = inputs.dataset
    t = inputs.teacher
    return {
        "schema": RUN_SCHEMA, "dataset": str(cfg.data.path), "dataset_id_map_hash": ds.manifest.get("id_map_hash"),
        "teacher": None if t is None else {"path": t.path, "source": t.source, "id_map_hash": t.id_map_hash,
                                           "top_n": t.top_n, "emb_dim": t.emb_dim, "notes": t.notes},
        "protocol": protocol_label(cfg), "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "status": state["stopped"] or "max epochs reached",
    }
