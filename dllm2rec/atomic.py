"""Crash-safe file output: write to a temporary name in the same folder, fsync, rename.

Readers never see a half-written file: either the old content or the new one. Folders that
hold several files get a ``manifest.json`` written LAST (``write_manifest``); ``read_manifest``
refuses a folder without a complete one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dllm2rec.errors import ManifestError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; artefacts should get the usual mode under the process umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` whole.

    A previous ``path`` survives until the new folder is complete; a crash leaves only a
    ``.<name>.*.tmp`` folder behind, which the next run removes. A crash between the two renames
    of the swap leaves the previous folder at ``.<name>.old.tmp``: ``restore_interrupted_swap``
    (called here and by ``read_manifest``) puts it back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = _old_name(path)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        restore_interrupted_swap(path)  # the swap failed between its two renames: put the old folder back
        raise


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old.tmp")


def restore_interrupted_swap(path: str | Path) -> bool:
    """Undo a folder swap of ``atomic_dir`` cut between its two renames (crash, SIGKILL, I/O error).

    Then ``path`` is missing and the previous complete folder sits at ``.<name>.old.tmp``: rename
    it back, so the previous good state is what readers and the next writer see. Returns True
    when it restored something.
    """
    path = Path(path)
    old = _old_name(path)
    if path.exists() or not old.is_dir():
        return False
    try:
        os.replace(old, path)
    except FileNotFoundError:  # another process restored it first
        return path.exists()
    return True


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Write ``folder/manifest.json`` atomically; call it after every other file is in place."""
    atomic_write_json(Path(folder) / MANIFEST, {**manifest, "complete": True})


def read_manifest(folder: str | Path, schema: str | None = None) -> dict:
    """Read and check ``folder/manifest.json``; ``schema`` must match its ``schema`` field."""
    p = Path(folder) / MANIFEST
    if not p.is_file() and not restore_interrupted_swap(folder):
        raise ManifestError(f"{folder}: no {MANIFEST}; the folder is incomplete or not an artefact")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{p}: truncated or corrupt, not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("complete") is not True:
        raise ManifestError(f"{p}: manifest is not marked complete")
    if schema is not None and data.get("schema") != schema:
        raise ManifestError(f"{p}: schema is {data.get('schema')!r}, expected {schema!r}")
    return data


def safe_join(root: str | Path, relative: str | Path) -> Path:
    """Join ``relative`` under ``root`` and refuse paths that escape it (``..``, absolute)."""
    root_r = Path(root).resolve()
    target = (root_r / relative).resolve()
    if target != root_r and root_r not in target.parents:
        raise ManifestError(f"path {relative!s} escapes the output folder {root_r}")
    return target
