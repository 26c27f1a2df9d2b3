"""Readers for raw interaction logs -> ``RawLog(interactions, titles, files)``.

Every reader returns the same thing: a DataFrame ``interactions`` with columns ``user`` (str),
``item`` (str raw id), ``timestamp`` (int64 >= 0) in file order, a ``titles`` dict (raw item id ->
title as found in the file; cleaning and dropping of unusable titles happens in ``protocol``),
and the list of files read (their sha256 goes into the dataset manifest).

Errors: every problem raises ``DataError`` naming the file and the 1-based LINE number (shown
as ``row``): malformed lines, missing columns or fields, non-integer ids (MovieLens formats),
missing / negative / non-integer timestamps, empty titles in item files that must carry one,
text that is not valid UTF-8 (or latin-1 where the format uses it). Nothing here evaluates
code: Amazon 2014 metadata (Python-literal dicts) is parsed with ``ast.literal_eval``, which
accepts literals only.

Formats:
- ``ml-100k``: ``u.data`` (user TAB item TAB rating TAB unix time), ``u.item`` (latin-1,
  ``id|title|date|...``). A RecBole ``ml-100k.inter``/``.item`` folder is accepted as well.
- ``ml-1m`` / ``ml-10m``: ``ratings.dat`` (``user::item::rating::time``), ``movies.dat``
  (``id::title::genres``; UTF-8, or latin-1 when the file is not UTF-8 as in ML-1M).
- ``recbole``: atomic ``<name>.inter`` (header ``user_id:token item_id:token ... timestamp:float``)
  and ``<name>.item`` (``item_id:token`` plus a ``*title*`` column; ``release_year`` when present
  is appended as `` (1995)`` so titles match the original MovieLens ones; ``title_year=False``
  turns that off).
- ``amazon2014`` / ``amazon2018``: 5-core reviews (JSON lines: ``reviewerID``, ``asin``,
  ``unixReviewTime``) + metadata (``asin``, ``title``; 2018 JSON lines, 2014 Python literals),
  plain or ``.gz``. Items without a metadata title are dropped by the protocol, not an error.
"""
from __future__ import annotations

import ast
import gzip
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from dllm2rec.errors import DataError


@dataclass
class RawLog:
    interactions: pd.DataFrame
    titles: dict[str, str]
    files: list[Path]


def _open_bytes(path: Path):
    if not path.is_file():
        raise DataError(path, "file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line without its newline); skip blank lines.

    Files over 32 MiB show a tqdm byte counter on an interactive terminal.
    """
    from tqdm import tqdm

    big = path.is_file() and path.stat().st_size > 32 << 20
    with _open_bytes(path) as fh, tqdm(total=None if path.suffix == ".gz" else path.stat().st_size,
                                       unit="B", unit_scale=True, desc=path.name, leave=False,
                                       disable=None if big else True) as bar:
        for lineno, raw in enumerate(_raw_lines(fh, path), start=1):
            bar.update(len(raw))
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(path, f"not valid {encoding}: {exc.reason} at byte {exc.start}", row=lineno) from None
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def _raw_lines(fh, path: Path) -> Iterator[bytes]:
    """Lines of ``fh``; a corrupt or truncated ``.gz`` becomes a DataError naming the file and line."""
    lineno = 0
    try:
        for lineno, raw in enumerate(fh, start=1):
            yield raw
    except (OSError, EOFError, zlib.error) as exc:
        if path.suffix != ".gz":
            raise
        raise DataError(path, f"corrupt or truncated gzip data: {exc}", row=lineno + 1) from None


def _file_encoding(path: Path) -> str:
    """'utf-8' if the whole file decodes as UTF-8, else 'latin-1' (MovieLens .dat files)."""
    with _open_bytes(path) as fh:
        try:
            fh.read().decode("utf-8")
            return "utf-8"
        except UnicodeDecodeError:
            return "latin-1"


def _int(text: str, path: Path, lineno: int, what: str) -> int:
    t = text.strip()
    if not t:
        raise DataError(path, f"missing {what}", row=lineno)
    try:
        v = int(t)
    except ValueError:
        raise DataError(path, f"{what} is not an integer: {t!r}", row=lineno) from None
    return v


def _timestamp(text: object, path: Path, lineno: int) -> int:
    """Unix time as a non-negative integer; accepts integral floats such as ``881250949.0``."""
    if text is None or (isinstance(text, str) and not text.strip()):
        raise DataError(path, "missing timestamp", row=lineno)
    if isinstance(text, bool):
        raise DataError(path, f"timestamp is not a number: {text!r}", row=lineno)
    try:
        v = float(text) if isinstance(text, str) else text
        f = float(v)
    except (TypeError, ValueError):
        raise DataError(path, f"timestamp is not a number: {text!r}", row=lineno) from None
    if not math.isfinite(f) or f != int(f):
        raise DataError(path, f"timestamp is not a whole number: {text!r}", row=lineno)
    if f < 0:
        raise DataError(path, f"negative timestamp {text!r}", row=lineno)
    return int(f)


def _frame(users: list, items: list, ts: list) -> pd.DataFrame:
    return pd.DataFrame({"user": pd.Series(users, dtype=object), "item": pd.Series(items, dtype=object),
                         "timestamp": pd.Series(ts, dtype="int64")})


def _split_log(path: Path, sep: str, n_min: int, encoding: str = "utf-8"):
    for lineno, line in iter_lines(path, encoding):
        parts = line.split(sep)
        if len(parts) < n_min:
            raise DataError(path, f"expected at least {n_min} {sep!r}-separated fields, got {len(parts)}", row=lineno)
        yield lineno, parts


def _read_ratings(path: Path, sep: str) -> pd.DataFrame:
    users, items, ts = [], [], []
    for lineno, p in _split_log(path, sep, 4):
        users.append(str(_int(p[0], path, lineno, "user id")))
        items.append(str(_int(p[1], path, lineno, "item id")))
        ts.append(_timestamp(p[3], path, lineno))
    return _frame(users, items, ts)


def _read_movie_titles(path: Path, sep: str, encoding: str) -> dict[str, str]:
    titles: dict[str, str] = {}
    for lineno, p in _split_log(path, sep, 2, encoding):
        item = str(_int(p[0], path, lineno, "item id"))
        if item in titles:
            raise DataError(path, f"duplicate item id {item}", row=lineno)
        if not p[1].strip():
            raise DataError(path, f"empty title for item {item}", row=lineno)
        titles[item] = p[1]
    return titles


def read_movielens_100k(folder: Path) -> RawLog:
    folder = Path(folder)
    if not (folder / "u.data").exists() and (folder / "ml-100k.inter").exists():
        return read_recbole(folder / "ml-100k.inter", folder / "ml-100k.item")
    data, item = folder / "u.data", folder / "u.item"
    return RawLog(_read_ratings(data, "\t"), _read_movie_titles(item, "|", "latin-1"), [data, item])


def read_movielens_dat(folder: Path) -> RawLog:
    """ML-1M / ML-10M ``ratings.dat`` + ``movies.dat`` (``::``-separated)."""
    folder = Path(folder)
    ratings, movies = folder / "ratings.dat", folder / "movies.dat"
    return RawLog(_read_ratings(ratings, "::"),
                  _read_movie_titles(movies, "::", _file_encoding(movies)), [ratings, movies])


def _recbole_header(path: Path) -> tuple[int, dict[str, int]]:
    for lineno, line in iter_lines(path):
        names = {}
        for k, field in enumerate(line.split("\t")):
            name, _, ftype = field.partition(":")
            if not ftype:
                raise DataError(path, f"header field {field!r} lacks ':type' (RecBole atomic format)", row=lineno)
            names[name.strip()] = k
        return lineno, names
    raise DataError(path, "empty file (no header)")


def _need(names: dict[str, int], col: str, path: Path, row: int) -> int:
    if col not in names:
        raise DataError(path, f"missing column {col!r} (header has {', '.join(names)})", row=row)
    return names[col]


def read_recbole(inter: Path, item: Path, title_year: bool = True) -> RawLog:
    inter, item = Path(inter), Path(item)
    hrow, cols = _recbole_header(inter)
    cu, ci, ct = (_need(cols, c, inter, hrow) for c in ("user_id", "item_id", "timestamp"))
    width = max(cu, ci, ct) + 1
    users, items, ts = [], [], []
    for lineno, line in iter_lines(inter):
        if lineno <= hrow:
            continue
        p = line.split("\t")
        if len(p) < width:
            raise DataError(inter, f"expected {len(cols)} tab-separated fields, got {len(p)}", row=lineno)
        if not p[cu].strip() or not p[ci].strip():
            raise DataError(inter, "missing user or item id", row=lineno)
        users.append(p[cu].strip())
        items.append(p[ci].strip())
        ts.append(_timestamp(p[ct], inter, lineno))

    hrow, icols = _recbole_header(item)
    c_id = _need(icols, "item_id", item, hrow)
    title_cols = [k for n, k in icols.items() if "title" in n or n in ("name", "item_name")]
    if not title_cols:
        raise DataError(item, f"no title column (header has {', '.join(icols)})", row=hrow)
    c_title, c_year = title_cols[0], icols.get("release_year")
    titles: dict[str, str] = {}
    for lineno, line in iter_lines(item):
        if lineno <= hrow:
            continue
        p = line.split("\t")
        if len(p) <= max(c_id, c_title):
            raise DataError(item, f"expected {len(icols)} tab-separated fields, got {len(p)}", row=lineno)
        key = p[c_id].strip()
        if key in titles:
            raise DataError(item, f"duplicate item id {key}", row=lineno)
        title = p[c_title].strip()
        if not title:
            raise DataError(item, f"empty title for item {key}", row=lineno)
        year = p[c_year].strip() if c_year is not None and c_year < len(p) else ""
        if title_year and len(year) == 4 and year.isdigit():
            title = f"{title} ({year})"
        titles[key] = title
    return RawLog(_frame(users, items, ts), titles, [inter, item])


def _record(line: str, path: Path, lineno: int, literal: bool) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        if not literal:
            raise DataError(path, f"not a JSON object: {exc.msg}", row=lineno) from None
        try:
            rec = ast.literal_eval(line)  # literals only: never executes code
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc2:
            raise DataError(path, f"not a JSON object or Python literal dict: {type(exc2).__name__}", row=lineno) from None
    if not isinstance(rec, dict):
        raise DataError(path, f"expected an object per line, got {type(rec).__name__}", row=lineno)
    return rec


def read_amazon(reviews: Path, meta: Path, version: int) -> RawLog:
    """Amazon 5-core reviews + item metadata; ``version`` is 2014 or 2018."""
    if version not in (2014, 2018):
        raise ValueError(f"Amazon version must be 2014 or 2018, got {version}")
    reviews, meta = Path(reviews), Path(meta)
    users, items, ts = [], [], []
    for lineno, line in iter_lines(reviews):
        rec = _record(line, reviews, lineno, literal=version == 2014)
        for key in ("reviewerID", "asin"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataError(reviews, f"missing or empty field {key!r}", row=lineno)
        users.append(rec["reviewerID"].strip())
        items.append(rec["asin"].strip())
        ts.append(_timestamp(rec.get("unixReviewTime"), reviews, lineno))
    wanted = set(items)
    titles: dict[str, str] = {}
    for lineno, line in iter_lines(meta):
        rec = _record(line, meta, lineno, literal=version == 2014)
        asin = rec.get("asin")
        if not isinstance(asin, str) or not asin.strip():
            raise DataError(meta, "missing or empty field 'asin'", row=lineno)
        title = rec.get("title")
        # A missing title is normal in Amazon metadata: the protocol drops such items.
        if asin.strip() in wanted and isinstance(title, str) and asin.strip() not in titles:
            titles[asin.strip()] = title
    return RawLog(_frame(users, items, ts), titles, [reviews, meta])
