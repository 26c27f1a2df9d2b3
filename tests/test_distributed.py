"""Rank/world logic that needs no second process: world-size check, shards, gather bookkeeping."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dllm2rec.train.batches import epoch_order, global_batch, step_seed, steps_per_epoch
from dllm2rec.train.distributed import check_world, gather_rows, shard, shard_bounds
from dllm2rec.errors import TrainingError


def test_world_size_mismatch_is_detected():
    check_world(2, {"WORLD_SIZE": "2"})
    check_world(1, {})
    with pytest.raises(TrainingError, match="WORLD_SIZE=2 processes but Accelerate sees 1"):
        check_world(1, {"WORLD_SIZE": "2"})


@pytest.mark.slow
def test_multi_gpu_launch_without_gpu_is_refused(tmp_path):
    """The real trap: `accelerate launch --multi_gpu` on a machine without GPUs and without
    ACCELERATE_USE_CPU starts two copies that each see a world of 1. Both must refuse to train."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    script = tmp_path / "probe.py"
    script.write_text("from dllm2rec.train.distributed import make_accelerator\nmake_accelerator()\nprint('TRAINED')\n")
    proc = subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", "29613", str(script)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "TRAINED" not in out
    assert "the launcher started WORLD_SIZE=2 processes but Accelerate sees 1" in out


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (1, 2), (256, 4)])
def test_shards_cover_every_row_once(n, world):
    rows = np.arange(n)
    parts = [shard(rows, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), rows)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert [shard_bounds(n, r, world)[1] - shard_bounds(n, r, world)[0] for r in range(world)] == sizes


class _FakeAccelerator:
    """Stands for `world` ranks at once: gather concatenates the ranks' padded tensors."""

    def __init__(self, world, locals_):
        self.num_processes, self._locals = world, locals_

    def gather(self, padded):
        width = padded.shape[0]
        out = []
        for t in self._locals:
            p = torch.zeros((width, *t.shape[1:]), dtype=t.dtype)
            p[: t.shape[0]] = t
            out.append(p)
        return torch.cat(out)


def test_gather_rows_drops_padding():
    n, world = 11, 3
    full = torch.arange(100, 100 + n)
    locals_ = [full[slice(*shard_bounds(n, r, world))] for r in range(world)]
    acc = _FakeAccelerator(world, locals_)
    assert torch.equal(gather_rows(acc, locals_[0], n), full)


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    a, b = epoch_order(3, 5, 100), epoch_order(3, 5, 100)
    assert np.array_equal(a, b) and not np.array_equal(a, epoch_order(3, 6, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(global_batch(a, 1, 32), a[32:64])
    assert step_seed(0, 1, 2, 0) == step_seed(0, 1, 2, 0) != step_seed(0, 1, 2, 1)
    assert steps_per_epoch(100, 32, 1) == 4 and steps_per_epoch(97, 32, 1) == 4 and steps_per_epoch(97, 32, 2) == 3 and steps_per_epoch(98, 32, 2) == 4
    assert steps_per_epoch(100, 32, 1, cap=2) == 2
