"""JSON-lines reading shared by every file format the project accepts (requests, teacher rankings)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from dllm2rec.errors import DataError


def json_objects(path: str | Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """Yield ``(line number from 1, object)`` per non-blank line; ``DataError`` naming the line for
    invalid JSON or a value that is not an object (``expected`` describes what the line should be)."""
    with open(path, encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"not valid JSON: {exc.msg} at column {exc.colno}", row=line_no) from exc
            if not isinstance(obj, dict):
                raise DataError(path, f"expected {expected}, got {type(obj).__name__}", row=line_no)
            yield line_no, obj
