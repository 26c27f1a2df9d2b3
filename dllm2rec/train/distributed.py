"""Rank / world / barrier / sharding for student training. Models and losses know nothing of this.

Traps this module guards against (docs in /work/shared/PLATFORM.md):
- ``accelerate launch --multi_gpu`` without a GPU and without ``ACCELERATE_USE_CPU=1`` starts
  unsynchronised copies that each believe they are process 0 of 1; ``--cpu --num_processes 2``
  silently starts one. ``check_world`` compares Accelerate's view with the launcher's WORLD_SIZE.
- DeepSpeed through Accelerate on CPU needs ``InitProcessGroupKwargs(backend="gloo")``.

Sharding: each global batch (a slice of the epoch order) is split into ``world`` contiguous,
nearly equal parts; rank r trains on part r. Evaluation splits the rows the same way and
gathers exactly one rank per row (``gather_rows``), so metrics equal a single-process run.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from dllm2rec.errors import TrainingError


def make_accelerator(log_dir: str | None = None, mixed_precision: str | None = None):
    """Build the Accelerator. On a machine without CUDA the process group uses gloo."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1 and _cpu_launch():
        # Only for a real CPU launch: a single process has no process group to configure, and
        # without ACCELERATE_USE_CPU Accelerate would not create one (check_world reports that).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    kwargs = {"kwargs_handlers": handlers}
    if log_dir is not None:
        kwargs.update(log_with="tensorboard", project_dir=log_dir)
    if mixed_precision:
        kwargs["mixed_precision"] = mixed_precision
    accelerator = Accelerator(**kwargs)
    check_world(accelerator.num_processes)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in {"1", "true", "yes"} and not is_deepspeed(accelerator):
        raise TrainingError(
            "the launcher asked for DeepSpeed but Accelerate runs without it (ACCELERATE_USE_CPU=1 or "
            "--cpu silently drop DeepSpeed; on CPU launch DeepSpeed without them, see launch/train_cpu.sh)")
    return accelerator


def _cpu_launch() -> bool:
    truthy = {"1", "true", "yes"}
    return (os.environ.get("ACCELERATE_USE_CPU", "").lower() in truthy
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy)


def check_world(num_processes: int, environ: dict | None = None) -> None:
    """Raise ``TrainingError`` when Accelerate's process count differs from the launcher's WORLD_SIZE."""
    env = os.environ if environ is None else environ
    expected = int(env.get("WORLD_SIZE", 1))
    if num_processes != expected:
        hint = ""
        if expected > num_processes and not torch.cuda.is_available():
            hint = (" On a machine without GPUs launch with 'accelerate launch --multi_gpu' AND "
                    "ACCELERATE_USE_CPU=1 (see launch/train_cpu.sh); '--multi_gpu' alone starts "
                    "unsynchronised copies.")
        raise TrainingError(
            f"the launcher started WORLD_SIZE={expected} processes but Accelerate sees "
            f"{num_processes}: the processes would train unsynchronised copies.{hint}"
        )


def is_main(accelerator) -> bool:
    return bool(accelerator.is_main_process)


def barrier(accelerator) -> None:
    accelerator.wait_for_everyone()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, end) of ``n`` items owned by ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    start, end = shard_bounds(len(rows), rank, world)
    return rows[start:end]


def gather_rows(accelerator, local: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate per-rank results in rank order, where rank r holds rows ``shard_bounds(n_total, r, world)``.

    Ranks pad their part to the same length for the collective; padding is dropped here by
    explicit bookkeeping, so the result has exactly ``n_total`` rows, each once.
    """
    world = accelerator.num_processes
    if world == 1:
        return local
    width = -(-n_total // world)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    gathered = accelerator.gather(padded).reshape(world, width, *local.shape[1:])
    parts = []
    for r in range(world):
        start, end = shard_bounds(n_total, r, world)
        parts.append(gathered[r, : end - start])
    return torch.cat(parts)


def all_finite(accelerator, value: torch.Tensor) -> bool:
    """True when ``value`` is finite on EVERY rank (one tiny all-reduce, so all ranks stop together)."""
    ok = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0], device=value.device)
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok, reduction="sum") / accelerator.num_processes
    return bool(ok.item() == 1.0)


def mean_across(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Mean of a small tensor over ranks (for logging epoch losses)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.clone(), reduction="mean")


def gather_objects(accelerator, obj) -> list:
    """Every rank's ``obj`` (small, trusted, in-memory only), in rank order."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed_batch(accelerator, local_batch: int, global_batch: int) -> None:
    """We feed tensors directly (no DataLoader), so fill DeepSpeed's 'auto' batch sizes ourselves."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = local_batch
    ds["train_batch_size"] = global_batch
    ds["gradient_accumulation_steps"] = 1


def average_gradients(accelerator, params) -> None:
    """DDP's gradient averaging done by hand, for runs that are not wrapped in DDP
    (``train.optimizer=lazy_adam`` with several processes: DDP's buckets are dense).

    Dense gradients are summed in one flat all-reduce. Sparse (row) gradients stay sparse: every
    rank's (row ids, rows) are all-gathered and summed, so a step costs O(rows touched), not O(N).
    Both are divided by the world size (DDP's mean). Every rank passes the same parameters in the
    same order; a rank without a gradient for a parameter contributes zeros, and a parameter whose
    gradient is sparse on any rank is treated as sparse on all (one small all-reduce decides).
    """
    world = accelerator.num_processes
    if world == 1:
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    dev = params[0].device  # collectives need tensors on the backend's device (CPU for gloo)
    flags = torch.tensor([1.0 if (p.grad is not None and p.grad.is_sparse) else 0.0 for p in params], device=dev)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    dense = [p for p, f in zip(params, flags.tolist()) if f == 0.0]
    sparse = [p for p, f in zip(params, flags.tolist()) if f == 1.0]
    if dense:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in dense:
            p.grad = flat[offset:offset + p.numel()].view_as(p)  # views of the reduced buffer, no copy
            offset += p.numel()
    for p in sparse:
        g = p.grad
        if g is None:
            g = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long, device=dev),
                                        torch.zeros(0, *p.shape[1:], dtype=p.dtype, device=dev), p.shape)
        elif not g.is_sparse:
            g = g.to_sparse(1)  # row-sparse view of a dense gradient (a rank that got one)
        g = g.coalesce()
        rows, values = g.indices()[0], g.values()
        sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([rows.numel()], device=dev))
        width = int(max(s.item() for s in sizes))
        pad_rows = torch.zeros(width, dtype=torch.long, device=dev)
        pad_rows[:rows.numel()] = rows
        pad_values = torch.zeros(width, *p.shape[1:], dtype=values.dtype, device=dev)
        pad_values[:rows.numel()] = values
        all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
        all_values = [torch.empty_like(pad_values) for _ in range(world)]
        dist.all_gather(all_rows, pad_rows)
        dist.all_gather(all_values, pad_values)
        keep = [int(s.item()) for s in sizes]
        ids = torch.cat([r[:k] for r, k in zip(all_rows, keep)])
        vals = torch.cat([v[:k] for v, k in zip(all_values, keep)]).div_(world)
        p.grad = torch.sparse_coo_tensor(ids[None, :], vals, p.shape, check_invariants=False).coalesce()
