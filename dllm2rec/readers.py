"""Artefact readers that turn a truncated or corrupt file into ``DataError(file, problem)``.

Library errors (``json.JSONDecodeError``, ``safetensors_rust.SafetensorError``, ``pyarrow.ArrowInvalid``,
``UnicodeDecodeError``, ...) name neither the artefact nor the problem in the project's terms; every
stage reads JSON, safetensors, Parquet and Arrow files through these functions instead.

Heavy libraries are imported inside the function that needs them, so the export loader (which
reads safetensors and JSON) imports neither pyarrow nor pandas.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dllm2rec.errors import DataError

_CORRUPT = "truncated or corrupt"


def _exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, "not found")


def read_text(path: str | Path) -> str:
    """UTF-8 text of ``path``; a file cut inside a multi-byte character is a ``DataError``."""
    path = Path(path)
    _exists(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"{_CORRUPT}: not UTF-8 text at byte {exc.start}") from exc


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; ``DataError`` naming the file, line and column when it is cut or malformed."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"{_CORRUPT} JSON ({exc.msg}; line {exc.lineno} column {exc.colno})") from exc


def read_safetensors(path: str | Path, framework: str = "pt") -> dict:
    """All tensors of a safetensors file (``framework`` "pt" -> torch, "np" -> numpy).

    safetensors never unpickles; a header or data section cut short is a ``DataError``."""
    path = Path(path)
    _exists(path)
    if framework == "pt":
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError (truncated header/data) is not exported under a stable name
        raise DataError(path, f"{_CORRUPT} safetensors file ({exc})") from exc


def _arrow_errors() -> tuple:
    import pyarrow as pa

    return (pa.ArrowException, OSError)


def read_parquet(path: str | Path, columns: list[str] | None = None):
    """A Parquet file as a ``pyarrow.Table``; missing requested columns and cut files are ``DataError``s."""
    import pyarrow.parquet as pq

    path = Path(path)
    _exists(path)
    try:
        if columns is not None:
            names = pq.read_schema(path).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(path, f"missing column(s) {missing} (have {names})")
        return pq.read_table(path, columns=columns)
    except _arrow_errors() as exc:
        raise DataError(path, f"{_CORRUPT} Parquet file ({exc})") from exc


def read_parquet_names(path: str | Path) -> list[str]:
    """Column names of a Parquet file (reads only the footer)."""
    import pyarrow.parquet as pq

    path = Path(path)
    _exists(path)
    try:
        return list(pq.read_schema(path).names)
    except _arrow_errors() as exc:
        raise DataError(path, f"{_CORRUPT} Parquet file ({exc})") from exc


def read_arrow_stream(path: str | Path):
    """An Arrow IPC stream file (``datasets.save_to_disk`` shards) as a ``pyarrow.Table``."""
    import pyarrow as pa

    path = Path(path)
    _exists(path)
    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all()
    except _arrow_errors() as exc:
        raise DataError(path, f"{_CORRUPT} Arrow stream ({exc})") from exc
