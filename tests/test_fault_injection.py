"""Faults: SIGKILL at a seeded random point, then resume; a full disk in the middle of a write.

Kill points. Every artefact reaches its final name through ``os.replace`` (``dllm2rec.atomic``),
so the states a crash can leave on disk are exactly "just before the n-th replace" (the temporary
file or folder is written, possibly only in part, and not renamed). The child process runs the
real command with ``os.replace`` wrapped (``HOOK`` below, no change to the code under test): it
counts the replaces whose target lies under the run's output folder and SIGKILLs itself just
before the n-th one. An uninterrupted run under the same hook gives the total count and the
reference result; n is drawn from ``1..total`` with a seeded generator. The killed run is then
rerun (``--resume`` for the student; the teacher's phases always skip finished shards) and must
give the same rows and metrics as the uninterrupted one.

- teacher: the real ``python -m teacher ground`` (3 shards, run one after the other in one
  process, as a job array on one node would) + ``teacher merge`` over synthetic generate/embed
  shards (no LLM: tests/test_teacher_fast.py builds the same inputs);
- student: the real ``python -m dllm2rec train`` (SASRec with dropout, sampled negatives, RD + ED;
  a checkpoint every step).
The default suite runs one kill point of each; ``-m slow`` runs several more.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    from test_teacher_fast import fake_llm_shards, teacher_cfg, tiny_dataset
except ImportError:  # pragma: no cover - collected as a package
    from tests.test_teacher_fast import fake_llm_shards, teacher_cfg, tiny_dataset

# Runs argv[1] (Python code) with os.replace wrapped; see the module docstring.
HOOK = r"""
import os, signal, sys
_real, _root = os.replace, os.path.realpath(os.environ["FAULT_ROOT"])
_kill_at, _count = int(os.environ.get("FAULT_KILL_AT", "0")), [0]

_trace = []

def _replace(src, dst, *a, **k):
    if os.path.realpath(os.fspath(dst)).startswith(_root):
        _count[0] += 1
        _trace.append(os.path.relpath(os.path.realpath(os.fspath(dst)), _root))
        if _count[0] == _kill_at:
            with open(os.environ["FAULT_LOG"], "w") as fh:
                fh.write(os.path.relpath(os.path.realpath(os.fspath(dst)), _root))
            os.kill(os.getpid(), signal.SIGKILL)
    return _real(src, dst, *a, **k)

os.replace = _replace
try:
    exec(compile(sys.argv[1], "<fault-main>", "exec"))
finally:
    if os.environ.get("FAULT_COUNT"):
        with open(os.environ["FAULT_COUNT"], "w") as fh:
            fh.write("\n".join(_trace) + "\n")
"""


def _child(code: str, root: Path, tmp: Path, kill_at: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FAULT_ROOT": str(root),
           "FAULT_KILL_AT": str(kill_at), "FAULT_LOG": str(tmp / "killed_at.txt"), "FAULT_COUNT": str(tmp / "count.txt")}
    env = {k: v for k, v in env.items() if not k.startswith("ACCELERATE_")}
    (tmp / "count.txt").unlink(missing_ok=True)
    return subprocess.run([sys.executable, "-c", HOOK, code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _kill_point(seed: int, total: int) -> int:
    return int(np.random.default_rng(seed).integers(1, total + 1))


# ------------------------------------------------------------------------------------ teacher
WORLD = 3


def _teacher_code(ds: Path, out: Path) -> str:
    ov = [f"dataset={ds}", f"output_dir={out}", "ground.top_n=5", "embed.threads=1"]
    return ("import sys\nfrom teacher.cli import run\n"
            f"for r in range({WORLD}):\n"
            f"    assert run(['ground', '--rank', str(r), '--world', '{WORLD}', '--quiet', *{ov!r}]) == 0\n"
            f"assert run(['merge', *{ov!r}]) == 0\n")


def _teacher_inputs(ds: Path, out: Path) -> None:
    cfg = teacher_cfg(ds, out)
    for r in range(WORLD):
        fake_llm_shards(cfg, r, WORLD)


def _teacher_result(out: Path) -> dict:
    from teacher.artifacts import read_rank_table

    man = json.loads((out / "manifest.json").read_text())
    return {"manifest": {k: man[k] for k in ("splits", "metrics", "top_n", "emb_dim", "id_map_hash")},
            "tables": {s: read_rank_table(out, s) for s in ("train", "valid", "test")}}


@pytest.fixture(scope="module")
def teacher_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_teacher")
    ds = tiny_dataset(root / "ds", n_rows=(40, 9, 9))
    out = root / "ref"
    _teacher_inputs(ds, out)
    _ok(_child(_teacher_code(ds, out), out, root))
    total = len((root / "count.txt").read_text().splitlines())
    return root, ds, total, _teacher_result(out)


def _teacher_kill_and_resume(teacher_ref, tmp_path, seed: int) -> None:
    root, ds, total, ref = teacher_ref
    out = tmp_path / "t"
    _teacher_inputs(ds, out)
    n = _kill_point(seed, total)
    proc = _child(_teacher_code(ds, out), out, tmp_path, kill_at=n)
    assert proc.returncode == -signal.SIGKILL, (n, proc.stderr[-2000:])
    where = (tmp_path / "killed_at.txt").read_text()
    done_before = {p: p.stat().st_mtime_ns for p in (out / "work/ground").rglob("*.done")}
    assert not (out / "manifest.json").exists()  # written last: the killed folder is never complete
    from dllm2rec.errors import Dllm2RecError
    from dllm2rec.data.knowledge import load_teacher

    with pytest.raises(Dllm2RecError):
        load_teacher(out, None)  # so the students' loader refuses it
    _ok(_child(_teacher_code(ds, out), out, tmp_path))  # the rerun: finished shards are skipped
    redone = len((tmp_path / "count.txt").read_text().splitlines())
    assert redone < total or not done_before, (redone, total)
    got = _teacher_result(out)
    assert got["manifest"] == ref["manifest"], f"killed before replace #{n} ({where})"
    for split, table in ref["tables"].items():
        assert set(got["tables"][split]) == set(table)
        for col, values in table.items():
            np.testing.assert_array_equal(got["tables"][split][col], values, err_msg=f"{split}.{col} after kill at {where}")
    for marker, mtime in done_before.items():  # shards finished before the kill were not redone
        assert marker.stat().st_mtime_ns == mtime, marker
    # a file the kill caught before its rename stays as a hidden .<name>.*.tmp, never under a real name
    assert all(p.name.startswith(".") for p in out.rglob("*.tmp"))
    print(f"teacher: killed before replace {n}/{total} ({where}); {len(done_before)} finished shard parts kept, "
          f"rerun wrote {redone} of {total}")


def test_teacher_sigkill_mid_shard_then_rerun_matches(teacher_ref, tmp_path):
    _teacher_kill_and_resume(teacher_ref, tmp_path, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_teacher_sigkill_more_points(teacher_ref, tmp_path, seed):
    _teacher_kill_and_resume(teacher_ref, tmp_path, seed)


# ------------------------------------------------------------------------------------ student
def _train_code(cfg: Path, out: Path, resume: bool) -> str:
    argv = ["train", "--config", str(cfg), f"train.output_dir={out}"] + (["--resume"] if resume else [])
    return f"import sys\nfrom dllm2rec.cli import main\nsys.exit(main({argv!r}))\n"


@pytest.fixture(scope="module")
def student_ref(tmp_path_factory):
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher

    root = tmp_path_factory.mktemp("fault_student")
    ds = synthetic_dataset(root / "ds", n_items=30, n_train=96, n_valid=32, n_test=32)
    teacher = synthetic_teacher(root / "teacher", load_dataset(ds), top_n=8, emb_dim=8)
    cfg = root / "run.yaml"
    cfg.write_text(f"data: {{path: {ds}}}\nmodel: {{name: sasrec, hidden: 16}}\n"
                   f"distill: {{teacher: {teacher}, rd: {{enabled: true, k: 5}}, ed: {{enabled: true}}}}\n"
                   "loss: {dro_alpha: 0.1}\neval: {ks: [5, 20]}\n"
                   "train: {epochs: 2, batch_size: 32, progress: false, checkpoint_every_steps: 1}\n")
    out = root / "ref"
    _ok(_child(_train_code(cfg, out, False), out, root))
    trace = (root / "count.txt").read_text().splitlines()
    return cfg, trace, out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _student_kill_and_resume(student_ref, tmp_path, seed: int, inside_swap: bool = False) -> None:
    """``inside_swap``: kill between the two renames of a checkpoint folder swap (seeded among them)."""
    cfg, trace, ref = student_ref
    total = len(trace)
    out = tmp_path / "run"
    if inside_swap:
        swaps = [i + 1 for i, dst in enumerate(trace) if dst == "checkpoints/last" and "checkpoints/.last.old.tmp" in trace[:i]]
        n = swaps[int(np.random.default_rng(seed).integers(len(swaps)))]
    else:
        n = _kill_point(seed, total)
    proc = _child(_train_code(cfg, out, False), out, tmp_path, kill_at=n)
    assert proc.returncode == -signal.SIGKILL, (n, proc.stderr[-2000:])
    where = (tmp_path / "killed_at.txt").read_text()
    if inside_swap:  # the previous checkpoint is only at its .old name now; resume must bring it back
        assert where == "checkpoints/last" and not (out / "checkpoints/last").exists()
        assert (out / "checkpoints/.last.old.tmp/manifest.json").is_file()
    assert not (out / "manifest.json").exists()  # the run manifest is written last
    _ok(_child(_train_code(cfg, out, True), out, tmp_path))
    redone = len((tmp_path / "count.txt").read_text().splitlines())
    if inside_swap:  # continued from the restored checkpoint instead of starting again
        assert redone < total, (redone, total)
    a, b = _metrics(ref), _metrics(out)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b], where
    for x, y in zip(a, b):
        assert y["losses"] == pytest.approx(x["losses"], rel=1e-6), f"killed before replace #{n} ({where})"
        assert y["valid"] == pytest.approx(x["valid"], rel=1e-6, abs=1e-9)
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (ref, out))
    for key in ("best_epoch", "epochs_run", "stopped", "protocol"):
        assert ra[key] == rb[key], key
    assert rb["valid"] == pytest.approx(ra["valid"], rel=1e-6, abs=1e-9)
    assert rb["test"] == pytest.approx(ra["test"], rel=1e-6, abs=1e-9)
    assert all(p.name.startswith(".") for p in out.rglob("*.tmp"))  # hidden temp names only
    assert not (out / "checkpoints" / ".last.old.tmp").exists()
    state = json.loads((out / "checkpoints/last/state.json").read_text())
    print(f"student: killed before replace {n}/{total} ({where}); resumed run ended at epoch {state['epoch']} "
          f"after {redone} of {total} writes; "
          f"weights bit-identical: {ra['param_digest'] == rb['param_digest']}")


def test_student_sigkill_mid_epoch_then_resume_matches(student_ref, tmp_path):
    _student_kill_and_resume(student_ref, tmp_path, seed=0)


def test_student_sigkill_between_checkpoint_swap_renames_then_resume_matches(student_ref, tmp_path):
    _student_kill_and_resume(student_ref, tmp_path, seed=0, inside_swap=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_student_sigkill_more_points(student_ref, tmp_path, seed):
    _student_kill_and_resume(student_ref, tmp_path, seed)


# ------------------------------------------------------------------------------------ disk full
def _enospc_after(nbytes: int):
    """A ``write`` that puts ``nbytes`` on disk and then fails like a full disk."""
    def write(path, data):
        with open(path, "wb") as fh:
            fh.write(bytes(data)[:nbytes])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_mid_file_keeps_old_file(tmp_path, monkeypatch):
    from pathlib import Path as P

    from dllm2rec.atomic import atomic_write_json, atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_json(target, {"old": True})
    before = target.read_bytes()
    monkeypatch.setattr(P, "write_bytes", lambda self, data: _enospc_after(5)(self, data))
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "x" * 1000)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file left


def test_disk_full_in_rename_keeps_old_folder(tmp_path, monkeypatch):
    """The folder swap fails between its two renames: the old folder is put back."""
    import dllm2rec.atomic as atomic

    target = tmp_path / "art"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
        atomic.write_manifest(tmp, {"schema": "x"})
    before = _snapshot(target)
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # 1: new manifest, 2: art -> .art.old.tmp, 3: new folder -> art
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "a.bin").write_bytes(b"new")
            atomic.write_manifest(tmp, {"schema": "x"})
    monkeypatch.undo()
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_crash_between_swap_renames_is_restored(tmp_path):
    """State a SIGKILL between the two renames leaves; readers and the next writer restore it."""
    from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest

    target = tmp_path / "art"
    with atomic_dir(target) as tmp:
        write_manifest(tmp, {"schema": "x", "v": 1})
    os.replace(target, tmp_path / ".art.old.tmp")  # the first rename happened, the second did not
    (tmp_path / ".art.abc.tmp").mkdir()  # the new folder, never renamed
    assert read_manifest(target, "x")["v"] == 1  # the reader puts the previous folder back
    os.replace(target, tmp_path / ".art.old.tmp")
    with pytest.raises(RuntimeError):
        with atomic_dir(target):  # a writer that fails: the restored old folder stays
            raise RuntimeError("boom")
    assert read_manifest(target, "x")["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_disk_full_mid_dataset_write_keeps_previous_dataset(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.bench.synthetic import synthetic_dataset

    ds = synthetic_dataset(tmp_path / "ds", n_items=12, n_train=20, n_valid=4, n_test=4)
    before = _snapshot(ds)
    real = pq.write_table

    def full(table, where, **kw):
        real(table, where, **kw)
        with open(where, "r+b") as fh:  # half of the file reached the disk
            fh.truncate(os.path.getsize(where) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OSError):
        synthetic_dataset(tmp_path / "ds", n_items=13, n_train=20, n_valid=4, n_test=4, seed=1)
    monkeypatch.undo()
    assert _snapshot(ds) == before and load_dataset(ds).n_items == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_disk_full_mid_checkpoint_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    import dllm2rec.train.checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    last = tmp_path / "checkpoints" / "last"

    def save(step):
        ckpt.save_checkpoint(last, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                             rng_states=[ckpt.rng_state()], state={"epoch": 0, "step": step}, config_text="x: 1\n")

    save(1)
    before = _snapshot(last)
    real = ckpt.save_file

    def full(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)
        with open(filename, "r+b") as fh:
            fh.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError):
        save(2)
    monkeypatch.undo()
    assert _snapshot(last) == before
    assert ckpt.load_checkpoint(last)["state"]["step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]


def test_disk_full_mid_teacher_part_leaves_shard_unfinished(tmp_path, monkeypatch):
    """A part file that fails to write gets no done marker: the shard is redone on the rerun."""
    import pyarrow.parquet as pq

    from teacher.ground import ground_phase
    from teacher.shards import ShardError

    ds = tiny_dataset(tmp_path / "ds", n_rows=(6, 2, 2))
    cfg = teacher_cfg(ds, tmp_path / "t")
    fake_llm_shards(cfg, 0, 1)
    real, calls = pq.write_table, []

    def full(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:  # the second split's part
            real(table, where, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OSError):
        ground_phase(cfg, 0, 1, progress=False)
    monkeypatch.undo()
    work = tmp_path / "t/work/ground"
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")
                  if p.is_file()) == ["train/part-00000-of-00001.done", "train/part-00000-of-00001.parquet"]
    with pytest.raises(ShardError):
        from teacher.artifacts import merge

        merge(cfg)
    stats = ground_phase(cfg, 0, 1, progress=False)
    assert stats["skipped"] == ["train"] and [d["split"] for d in stats["done"]] == ["valid", "test"]
