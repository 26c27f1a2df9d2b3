"""One study cell, trained under its lock: the unit a study worker (in-process or child) runs.

``train_cell(cfg, threads)`` holds ``<run_dir>.lock`` (``dllm2rec.lockfile``: atomic lock file
with the owner's pid and host; a lock of a dead process on this host is taken over) while it
checks and trains the cell, so parallel ``--jobs`` children, several ``experiment`` invocations
over the same study and queue workers never train one cell at once, and a cell whose
``results.json`` exists is never trained again (except a stale one under ``--rerun-stale``).

Child-process entry (``--jobs > 1``): ``python -m dllm2rec.studies.cell_run THREADS RERUN_STALE
BASE|- OVERRIDE...``; exit status 0 trained, ``BUSY`` (3) another live process holds the cell,
``FINISHED`` (4) the cell was already done, 2 a ``Dllm2RecError``.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from dllm2rec.config import read_yaml

BUSY, FINISHED = 3, 4
# Keys that may differ between a cached run and the current resolution without making it stale.
_VOLATILE = frozenset({("train", "output_dir"), ("train", "progress")})


def changed_keys(run_dir: Path, cfg) -> list[str]:
    """Config keys whose value in ``<run_dir>/config.yaml`` differs from ``cfg`` (a ``RunConfig``)."""
    from dllm2rec.config import RunConfig, config_diff, config_to_dict

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return []
    # A key added after the run was made counts as unchanged while it keeps its default.
    return config_diff(read_yaml(saved_file, "run config"), config_to_dict(cfg), _VOLATILE, config_to_dict(RunConfig()))


def lock_path(run_dir: Path) -> Path:
    """``<out>/<student>/<variant>/seed<k>.lock``: beside the run folder, which --rerun-stale deletes."""
    return run_dir.with_name(run_dir.name + ".lock")


def train_cell(cfg, threads: int, rerun_stale: bool = False) -> str:
    """Train one cell while holding its lock (``dllm2rec.lockfile``); -> "trained" or "finished".

    Under the lock the cell is checked again: a run another worker finished meanwhile is not
    retrained ("finished"), except a stale one with ``rerun_stale``. ``LockBusy`` when another live
    process holds the cell."""
    import torch

    from dllm2rec.lockfile import hold
    from dllm2rec.train.loop import train

    run_dir = Path(cfg.train.output_dir)
    with hold(lock_path(run_dir)):
        if (run_dir / "results.json").is_file():
            if not (rerun_stale and changed_keys(run_dir, cfg)):
                return "finished"
            _clear_run(run_dir)
        torch.set_num_threads(threads)
        train(cfg, resume=True)
    return "trained"


def _clear_run(run_dir: Path) -> None:
    """Delete a stale run's files; its ``train.log`` stays (a ``--jobs`` child may be writing it)."""
    for p in run_dir.iterdir():
        if p.name == "train.log":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _worker(argv: list[str]) -> int:
    """Child-process entry: ``python -m dllm2rec.studies.cell_run THREADS RERUN_STALE BASE|- OVERRIDE...``.

    Exit status 0 trained, 3 (``BUSY``) another process holds the cell, 4 (``FINISHED``) already done."""
    from dllm2rec.config import load_config
    from dllm2rec.errors import Dllm2RecError
    from dllm2rec.lockfile import LockBusy

    try:
        outcome = train_cell(load_config(None if argv[2] == "-" else argv[2], argv[3:]), int(argv[0]), argv[1] == "1")
    except LockBusy as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return BUSY
    except Dllm2RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return FINISHED if outcome == "finished" else 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
