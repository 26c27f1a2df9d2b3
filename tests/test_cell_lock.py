"""Per-cell locks: concurrent workers never train one study cell twice; stale locks are taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dllm2rec.cli import main
from dllm2rec.lockfile import LockBusy, acquire, hold, read_owner, release
from dllm2rec.studies.cell_run import lock_path

REPO = Path(__file__).resolve().parents[1]

# Each of two processes walks the same 40 "cells"; a cell is worked on by whoever holds its lock
# and is not done yet. The work appends the worker's name to the cell's log and marks it done.
_CONTENDER = """
import sys, time
from pathlib import Path
from dllm2rec.lockfile import LockBusy, hold
root, name = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{name}").write_text("")
while not (root / "go").exists():
    time.sleep(0.001)
for i in range(40):
    cell = root / f"cell{i}"
    try:
        with hold(root / f"cell{i}.lock"):
            if (cell / "done").exists():
                continue
            cell.mkdir(exist_ok=True)
            with open(cell / "log", "a") as fh:
                fh.write(name + "\\n")
            time.sleep(0.003)
            (cell / "done").write_text(name)
    except LockBusy:
        pass
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _release_when_ready(root: Path, names: list[str], procs, timeout: float = 60.0) -> None:
    """Start the race only once every contender has announced itself (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not all((root / f"ready-{n}").exists() for n in names):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "contenders did not start"
        time.sleep(0.01)
    (root / "go").write_text("")


def test_two_processes_work_each_cell_exactly_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(tmp_path), name], env=_env(), cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    _release_when_ready(tmp_path, ["a", "b"], procs)
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    logs = [(tmp_path / f"cell{i}" / "log").read_text().split() for i in range(40)]
    assert all(len(lines) == 1 for lines in logs), [x for x in logs if len(x) != 1]
    leftovers = ({p.name for p in tmp_path.iterdir()} - {"go", "ready-a", "ready-b"}
                 - {f"cell{i}" for i in range(40)})
    assert not leftovers  # every lock released, no temporary or guard files


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path: Path, **owner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "token": "x", "start": None, **owner}))


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    lock = tmp_path / "c.lock"
    _write_lock(lock, pid=_dead_pid())
    with hold(lock) as mine:
        assert read_owner(lock)["pid"] == os.getpid() and read_owner(lock)["token"] == mine["token"]
    assert not lock.exists()
    # pid reused by a live process (ours) that started at another time: also stale
    _write_lock(lock, pid=os.getpid(), start="1")
    release(lock, acquire(lock))
    assert not lock.exists()


_TAKER = """
import sys, time
from pathlib import Path
from dllm2rec.lockfile import LockBusy, acquire
root, name = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{name}").write_text("")
while not (root / "go").exists():
    time.sleep(0.001)
try:
    acquire(root / "c.lock")
    print("won", flush=True)
    # hold the lock (stay alive) until the test has seen the other contender finish
    while not (root / "stop").exists():
        time.sleep(0.01)
except LockBusy:
    print("busy", flush=True)
"""


def test_two_processes_racing_for_one_stale_lock_one_wins(tmp_path):
    _write_lock(tmp_path / "c.lock", pid=_dead_pid())
    procs = [subprocess.Popen([sys.executable, "-c", _TAKER, str(tmp_path), name], env=_env(), cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    _release_when_ready(tmp_path, ["a", "b"], procs)
    deadline = time.monotonic() + 60  # the loser exits; two winners would both wait for "stop"
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "stop").write_text("")
    assert sorted(p.communicate(timeout=60)[0].strip() for p in procs) == ["busy", "won"]


def test_live_or_foreign_host_lock_is_respected(tmp_path):
    lock = tmp_path / "c.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(f"/proc/{sleeper.pid}/stat") as fh:
            start = fh.read().rsplit(")", 1)[1].split()[19]
        _write_lock(lock, pid=sleeper.pid, start=start)
        with pytest.raises(LockBusy, match=rf"c\.lock: held by pid {sleeper.pid} on host {socket.gethostname()}"):
            acquire(lock)
    finally:
        sleeper.kill()
        sleeper.wait()
    _write_lock(lock, pid=_dead_pid(), host="some-other-host")  # cannot be checked: never taken over
    with pytest.raises(LockBusy, match="on host some-other-host"):
        acquire(lock)
    release(lock, {"token": "not-the-owner"})  # release never removes someone else's lock
    assert lock.exists()


def _study(tmp_path: Path) -> Path:
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher
    from dllm2rec.data.dataset import load_dataset

    ds = synthetic_dataset(tmp_path / "ds", n_items=30, n_train=128, n_valid=32, n_test=32)
    teacher = synthetic_teacher(tmp_path / "teacher", load_dataset(ds), top_n=20, emb_dim=8)
    raw = yaml.safe_load((REPO / "launch/configs/study_tiny.yaml").read_text())
    raw.update(dataset=str(ds), teacher=str(teacher), out=str(tmp_path / "out"), students=["gru4rec"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_experiment_skips_a_held_cell_and_takes_over_a_stale_one(tmp_path, capsys):
    study = _study(tmp_path)
    out = tmp_path / "out"
    held, stale = out / "gru4rec/none/seed0", out / "gru4rec/none/seed1"
    _write_lock(lock_path(held), pid=os.getppid(), start=None)  # a live process (pytest's parent)
    _write_lock(lock_path(stale), pid=_dead_pid())
    assert main(["experiment", "--study", str(study), "--jobs", "1", "--threads-per-job", "1",
                 "--only", "variant=none", "--set", "train.epochs=1"]) == 0
    err = capsys.readouterr().err
    assert "gru4rec/none/seed0: skipped (busy" in err and "being trained by another worker" in err
    assert not (held / "results.json").exists()
    assert (stale / "results.json").is_file() and not lock_path(stale).exists()


@pytest.mark.slow  # two `experiment` processes (each imports torch + accelerate): ~30 s on a loaded 2-core box
def test_two_concurrent_experiment_workers_train_each_cell_once(tmp_path):
    study = _study(tmp_path)
    cmd = [sys.executable, "-m", "dllm2rec", "experiment", "--study", str(study), "--jobs", "1", "--threads-per-job", "1"]
    procs = [subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trained = [line.split("] ", 1)[1].split(":")[0] for _, err in outs for line in err.splitlines()
               if line.startswith("[") and ": done in" in line]
    labels = sorted(f"gru4rec/{v}/seed{s}" for v in ("none", "dllm2rec") for s in (0, 1))
    assert sorted(trained) == labels  # each cell trained by exactly one of the two workers
    for label in labels:
        epochs = [json.loads(x)["epoch"] for x in (tmp_path / "out" / label / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [0, 1]
    assert not list((tmp_path / "out").glob("*/*/*.lock"))
    # a third invocation trains nothing: finished cells are never retrained
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/*/seed*/results.json")}
    third = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and ": done in" not in third.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
