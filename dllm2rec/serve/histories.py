"""Read user histories for ``recommend`` from JSON lines or CSV and map them to item ids.

Input formats (chosen by ``--format`` or the file extension):
- JSON lines (``.jsonl``/``.ndjson``/``.json``): one object per line, ``{"history": [...],
  "id": <any JSON scalar, optional>}``; blank lines are skipped. History items are ints (item ids
  0..N-1) or strings (item titles).
- CSV (``.csv``): a header with a ``history`` column (and optionally ``id``); the history cell lists
  items oldest first separated by ``|``. A token of digits only is an id, anything else a title.

Items are matched against the dataset's id/title table: a title matches exactly, else after
stripping surrounding whitespace (the reference Games titles carry stray spaces); a title shared
by several ids is refused (give the id). Unknown or ambiguous items raise ``DataError`` naming
the file, the line and the item; with ``skip_unknown=True`` they are dropped and reported in the
returned ``Request.unknown`` instead (never silently). ``items="ids"|"titles"`` forces one kind.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dllm2rec.data.jsonl import json_objects
from dllm2rec.errors import DataError

SEPARATOR = "|"
FORMATS = ("auto", "jsonl", "csv")
ITEM_KINDS = ("auto", "ids", "titles")


@dataclass
class Request:
    """One parsed input row: ``line`` is 1-based in the input file; ``items`` are ids, oldest first."""

    line: int
    rid: Any
    items: list[int]
    unknown: list[Any] = field(default_factory=list)


class ItemTable:
    """Id/title lookup for N items (ids 0..N-1)."""

    def __init__(self, titles: list[str]):
        self.titles = list(titles)
        self.exact: dict[str, list[int]] = {}
        self.stripped: dict[str, list[int]] = {}
        for i, t in enumerate(self.titles):
            self.exact.setdefault(t, []).append(i)
            self.stripped.setdefault(t.strip(), []).append(i)

    @property
    def n_items(self) -> int:
        return len(self.titles)

    def resolve(self, item: Any, kind: str) -> int | None | str:
        """Return the id, None if unknown, or an error text (ambiguous title / wrong type)."""
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            return f"item {item!r} is neither an id (integer) nor a title (string)"
        if isinstance(item, int):
            if kind == "titles":
                return f"item {item!r} is an integer but --items titles was given"
            return item if 0 <= item < self.n_items else None
        if kind == "ids":
            text = item.strip()
            if not (text.isdigit() and text.isascii()):
                return f"item {item!r} is not an integer id (--items ids)"
            return int(text) if int(text) < self.n_items else None
        ids = self.exact.get(item) or self.stripped.get(item.strip())
        if not ids:
            return None
        if len(ids) > 1:
            return f"title {item!r} is ambiguous (ids {', '.join(map(str, ids))}); give the id instead"
        return ids[0]


def _map_items(path: Path, line: int, raw: list, table: ItemTable, kind: str, skip_unknown: bool) -> Request:
    ids, unknown = [], []
    for item in raw:
        got = table.resolve(item, kind)
        if isinstance(got, str):
            raise DataError(path, got, row=line)
        if got is None:
            if not skip_unknown:
                raise DataError(path, f"unknown item {item!r} (ids are 0..{table.n_items - 1}; "
                                "titles must match the dataset's items table; --skip-unknown drops such items)", row=line)
            unknown.append(item)
            continue
        ids.append(got)
    return Request(line=line, rid=None, items=ids, unknown=unknown)


def _read_jsonl(path: Path, table: ItemTable, kind: str, skip_unknown: bool) -> list[Request]:
    out = []
    for line_no, obj in json_objects(path, "a JSON object with a 'history' list"):
        if "history" not in obj:
            raise DataError(path, f"missing key 'history' (keys: {', '.join(sorted(obj)) or 'none'})", row=line_no)
        hist = obj["history"]
        if not isinstance(hist, list):
            raise DataError(path, f"'history' must be a list of item ids or titles, got {type(hist).__name__}", row=line_no)
        if not hist:
            raise DataError(path, "empty history: a recommendation needs at least one item", row=line_no)
        rid = obj.get("id", line_no)
        if isinstance(rid, (dict, list)):
            raise DataError(path, "'id' must be a JSON scalar (string or number)", row=line_no)
        req = _map_items(path, line_no, hist, table, kind, skip_unknown)
        req.rid = rid
        out.append(req)
    return out


def _read_csv(path: Path, table: ItemTable, kind: str, skip_unknown: bool) -> list[Request]:
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(path, "empty CSV file (expected a header with a 'history' column)", row=1)
            cols = [h.strip() for h in header]
            if "history" not in cols:
                raise DataError(path, f"no 'history' column in the header (got {', '.join(cols)})", row=1)
            h_col, id_col = cols.index("history"), (cols.index("id") if "id" in cols else None)
            for fields in reader:
                line_no = reader.line_num
                if not fields or all(not f.strip() for f in fields):
                    continue
                if len(fields) != len(cols):
                    raise DataError(path, f"expected {len(cols)} fields like the header, got {len(fields)}", row=line_no)
                tokens = [t.strip() for t in fields[h_col].split(SEPARATOR)]
                if not any(tokens):
                    raise DataError(path, "empty history: a recommendation needs at least one item", row=line_no)
                if "" in tokens:
                    raise DataError(path, f"empty item between '{SEPARATOR}' separators", row=line_no)
                raw = [int(t) if kind != "titles" and t.isdigit() and t.isascii() else t for t in tokens]
                req = _map_items(path, line_no, raw, table, kind, skip_unknown)
                req.rid = fields[id_col] if id_col is not None else line_no
                out.append(req)
        except csv.Error as exc:
            raise DataError(path, f"malformed CSV: {exc}", row=reader.line_num) from exc
    return out


def read_histories(path: str | Path, table: ItemTable, fmt: str = "auto", items: str = "auto",
                   skip_unknown: bool = False) -> list[Request]:
    """Parse every row of ``path`` (all rows are checked before any recommendation is made)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    if items not in ITEM_KINDS:
        raise ValueError(f"items must be one of {ITEM_KINDS}")
    if not path.is_file():
        raise DataError(path, "input file not found")
    if fmt == "auto":
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            fmt = "jsonl"
        elif suffix == ".csv":
            fmt = "csv"
        else:
            raise DataError(path, f"cannot tell the format from the extension {suffix!r}; use --format jsonl|csv")
    try:
        reqs = (_read_jsonl if fmt == "jsonl" else _read_csv)(path, table, items, skip_unknown)
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    if not reqs:
        raise DataError(path, "no histories in the file")
    return reqs
