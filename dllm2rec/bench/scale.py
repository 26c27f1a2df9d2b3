"""``bench scale``: step time and peak memory vs catalogue size; 1 vs 2 processes; DDP vs ZeRO-2.

For each catalogue size (default 20k, 200k, 2M items) a SASRec student (hidden 64, BCE, global
batch 256, random histories) runs a few REAL training steps through the trainer's pieces
(``Encoder`` + ``StepObjective`` + Accelerate/DeepSpeed) in a fresh worker process:
- 1 process (plain),
- 2 processes DDP over gloo (``accelerate launch --multi_gpu`` + ACCELERATE_USE_CPU=1),
- 2 processes DeepSpeed ZeRO-2 (``launch/accelerate_zero2.yaml``).
Reported: median step time, peak RSS per rank (ru_maxrss, includes the ~0.5 GB interpreter +
torch baseline), and (1 process) the full-ranking evaluation time per 10k rows. A configuration
whose estimated memory exceeds the machine's available memory is skipped and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Bytes per item held by each rank (fp32, hidden 64): parameters = item embedding (64) + output
# row (64 + bias) = 129 floats = 516 B; gradients 516 B; Adam moments 1032 B. DDP replicates all
# three (+ its gradient buckets, another 516 B). ZeRO-2 keeps the parameters whole, partitions
# gradients, moments and the fp32 master copy: 516 + (516 + 1032 + 516) / world.
BYTES_PER_ITEM = {"single": 2064, "ddp": 2580, "zero2": 516 + 2064 // 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", default="20000,200000,2000000", help="comma-separated catalogue sizes")
    parser.add_argument("--modes", default="single,ddp,zero2", help="subset of single,ddp,zero2")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--eval-rows", type=int, default=10000, help="rows for the evaluation timing (single)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    parser.add_argument("--out", default="runs/bench/scale_bench.md", help="markdown output (+ .json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def worker(args) -> None:
    """One configuration, inside the launched process(es)."""
    import resource

    import torch

    from dllm2rec.train.batches import Batch
    from dllm2rec.config import load_config
    from dllm2rec.train.distributed import configure_deepspeed_batch, gather_objects, make_accelerator
    from dllm2rec.eval.evaluate import split_ranks
    from dllm2rec.train.batches import SplitTensors
    from dllm2rec.models import build_student
    from dllm2rec.train.objective import Encoder, StepObjective

    n = int(args.items)
    cfg = load_config(None, ["model.name=sasrec", "loss.objective=bce", "train.batch_size=256"])
    accelerator = make_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    local = cfg.train.batch_size // world
    torch.manual_seed(0)
    student = build_student(cfg.model, n)
    encoder = Encoder(student)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    configure_deepspeed_batch(accelerator, local, cfg.train.batch_size)
    encoder, optimizer = accelerator.prepare(encoder, optimizer)
    objective = StepObjective(cfg, n, torch.randint(0, n, (1000,)))
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(2 + args.steps):
        hist = torch.randint(0, n, (local, 10), generator=gen)
        batch = Batch(rows=torch.arange(local), history=hist, lengths=torch.full((local,), 10),
                      target=torch.randint(0, n, (local,), generator=gen))
        t = time.perf_counter()
        loss = sum(objective(encoder, student, batch, gen).values())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        accelerator.wait_for_everyone()
        if step >= 2:
            times.append(time.perf_counter() - t)
    peak = gather_objects(accelerator, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"items": n, "world": world, "deepspeed": accelerator.distributed_type.value,
              "step_median_s": statistics.median(times), "step_times_s": times, "peak_rss_bytes": peak}
    if world == 1 and args.eval_rows:
        r = args.eval_rows
        data = SplitTensors(torch.randint(0, n, (r, 10)), torch.full((r,), 10), torch.randint(0, n, (r,)), torch.arange(r))
        t = time.perf_counter()
        split_ranks(accelerator.unwrap_model(encoder).student, data, accelerator, chunk=cfg.loss.item_chunk,
                    batch_size=cfg.train.eval_batch_size)
        result["eval_seconds_per_10k_rows"] = (time.perf_counter() - t) * 10000 / r
    if rank == 0 and args.result:
        Path(args.result).write_text(json.dumps(result))


def _launch(mode: str, items: int, args, result: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    tail = ["-m", "dllm2rec.bench.scale", "--worker", "--items", str(items), "--steps", str(args.steps),
            "--eval-rows", str(args.eval_rows), "--result", str(result)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "29655"]
    if mode == "single":
        cmd = [sys.executable, *tail]
    elif mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [*launch, "--multi_gpu", *tail]
    else:  # zero2: no ACCELERATE_USE_CPU (it would drop DeepSpeed)
        cmd = [*launch[:3], "--config_file", str(ROOT / "launch/accelerate_zero2.yaml"), *launch[3:], *tail]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        return proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {args.timeout} s"


def run(args: argparse.Namespace) -> int:
    if args.worker:
        worker(args)
        return 0
    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    rows, lines = [], ["## bench scale", "", f"Command: `python -m dllm2rec {' '.join(sys.argv[1:])}`  ",
                       f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1 (set by bench)')}, "
                       f"load average {os.getloadavg()[0]:.1f} at the start. SASRec hidden 64, BCE, global batch 256, "
                       f"median of {args.steps} steps after 2 warm-up steps.", "",
                       "| items | mode | processes | step (s) | peak RSS per rank (GB) | est. state per rank (GB) | eval per 10k rows (s) |",
                       "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for items in [int(x) for x in args.items.split(",")]:
            for mode in args.modes.split(","):
                world = 1 if mode == "single" else 2
                est = BYTES_PER_ITEM[mode] * items
                if est * world * 1.5 > _available_bytes():
                    rows.append({"items": items, "mode": mode, "skipped": f"needs ~{est * world / 1e9:.1f} GB"})
                    lines.append(f"| {items:,} | {mode} | {world} | skipped: needs ~{est * world / 1e9:.1f} GB, "
                                 f"{_available_bytes() / 1e9:.1f} GB available | | {est / 1e9:.2f} | |")
                    continue
                res = Path(tmp) / f"{mode}_{items}.json"
                t = time.time()
                rc, log = _launch(mode, items, args, res)
                if rc != 0 or not res.is_file():
                    rows.append({"items": items, "mode": mode, "error": log})
                    lines.append(f"| {items:,} | {mode} | {world} | failed (rc {rc}, see .json) | | {est / 1e9:.2f} | |")
                    continue
                r = json.loads(res.read_text())
                r.update(mode=mode, wall_seconds=round(time.time() - t, 1), est_state_bytes_per_rank=est)
                rows.append(r)
                ev = r.get("eval_seconds_per_10k_rows")
                lines.append(f"| {items:,} | {mode} | {world} | {r['step_median_s']:.3f} | "
                             f"{' / '.join(f'{b / 1e9:.2f}' for b in r['peak_rss_bytes'])} | {est / 1e9:.2f} | "
                             f"{'' if ev is None else f'{ev:.2f}'} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
        atomic_write_json(Path(args.out).with_suffix(".json"), rows)
    return 0


if __name__ == "__main__":  # worker entry: python -m dllm2rec.bench.scale --worker ...
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
