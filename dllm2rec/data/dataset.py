"""Prepared dataset folders (schema ``dllm2rec.dataset/1``): save, load, validate.

Folder layout (see docs/ARCHITECTURE.md, stage 1):
- ``splits/``: ``datasets.DatasetDict.save_to_disk`` with splits train / valid / test, one shard
  each; columns ``row_id`` int64, ``user`` string, ``history`` fixed-size list<int64>[L],
  ``history_len`` int64, ``target`` int64, ``timestamp`` int64. Fingerprints are content hashes,
  so preparing the same input twice gives byte-identical folders.
- ``items.parquet``: ``id`` int64 (0..N-1), ``title`` string, ``raw_id`` string.
- ``manifest.json``: written last (``atomic.write_manifest``); the folder itself is built in a
  temporary sibling and renamed into place, so a failed run leaves no partial output.

``load_dataset(path) -> Dataset`` reads the Arrow files with pyarrow directly (no ``datasets``
import, so it is fast) and validates: manifest complete, id table hash, counts, ids in range,
``history_len`` in 1..L, padding exactly after ``history_len``, unique row ids.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest
from dllm2rec.data.protocol import SPLITS
from dllm2rec.errors import DataError, ManifestError
from dllm2rec.readers import read_arrow_stream, read_parquet

SCHEMA = "dllm2rec.dataset/1"
COLUMNS = ("row_id", "user", "history", "history_len", "target", "timestamp")
DOMAINS = {
    "movies": {"item": "movie", "items": "movies", "verb": "watched"},
    "games": {"item": "video game", "items": "video games", "verb": "played"},
    "toys": {"item": "toy", "items": "toys", "verb": "bought"},
    "books": {"item": "book", "items": "books", "verb": "read"},
}


def relax_modes(folder: Path) -> None:
    """Give a folder built with mkdtemp/mkstemp (0700/0600) the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def id_map_hash(titles: list[str]) -> str:
    """sha256 over ``"{id}\\t{title}\\n"`` for every item in id order (shared by all stages)."""
    h = hashlib.sha256()
    for i, t in enumerate(titles):
        h.update(f"{i}\t{t}\n".encode("utf-8"))
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Dataset:
    """A loaded dataset folder. ``splits[name]`` holds numpy arrays (see module docstring)."""
    path: Path
    manifest: dict
    titles: list[str]
    splits: dict[str, dict[str, np.ndarray]] = field(repr=False)

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @property
    def padding_id(self) -> int:
        return len(self.titles)

    @property
    def max_history(self) -> int:
        return int(self.manifest["max_history"])

    @property
    def id_map_hash(self) -> str:
        return self.manifest["id_map_hash"]


def _split_table(cols: dict[str, np.ndarray], L: int) -> pa.Table:
    hist = np.ascontiguousarray(cols["history"], dtype=np.int64).reshape(-1)
    return pa.table({
        "row_id": pa.array(cols["row_id"], pa.int64()),
        "user": pa.array([str(u) for u in cols["user"]], pa.string()),
        "history": pa.FixedSizeListArray.from_arrays(pa.array(hist, pa.int64()), L),
        "history_len": pa.array(cols["history_len"], pa.int64()),
        "target": pa.array(cols["target"], pa.int64()),
        "timestamp": pa.array(cols["timestamp"], pa.int64()),
    })


def _content_fingerprint(table: pa.Table, salt: str) -> str:
    """16-hex content hash used as the ``datasets`` fingerprint (its default is random)."""
    h = hashlib.sha256(salt.encode())
    for col in table.columns:
        for chunk in col.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)
    return h.hexdigest()[:16]


def save_dataset(out: str | Path, *, name: str, titles: list[str], splits: dict[str, dict[str, np.ndarray]],
                 max_history: int, protocol: dict, domain: dict, sources: list[dict],
                 raw_items: list[str] | None = None, extra: dict | None = None) -> dict:
    """Write a dataset folder atomically (built in a temp sibling, manifest last); return the manifest."""
    import datasets  # heavy import, only when writing
    from datasets.utils import logging as ds_logging

    validate_splits(out, titles, splits, max_history, timestamps=protocol.get("timestamps", True))
    features = datasets.Features({
        "row_id": datasets.Value("int64"), "user": datasets.Value("string"),
        "history": datasets.List(datasets.Value("int64"), length=max_history),
        "history_len": datasets.Value("int64"), "target": datasets.Value("int64"),
        "timestamp": datasets.Value("int64"),
    })
    hmap = id_map_hash(titles)
    dd = {}
    for split in SPLITS:
        table = _split_table(splits[split], max_history).cast(features.arrow_schema)
        dd[split] = datasets.Dataset(table, info=datasets.DatasetInfo(features=features),
                                     split=datasets.NamedSplit(split),
                                     fingerprint=_content_fingerprint(table, f"{hmap}/{split}"))
    manifest = {
        "schema": SCHEMA, "name": name, "n_items": len(titles), "padding_id": len(titles),
        "max_history": max_history, "counts": {s: int(len(splits[s]["target"])) for s in SPLITS},
        "protocol": protocol, "domain": domain, "id_map_hash": hmap, "sources": sources,
        **(extra or {}),
    }
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # its per-split bars are noise for sub-second writes
    try:
        with atomic_dir(out) as tmp:
            datasets.DatasetDict(dd).save_to_disk(str(tmp / "splits"), num_shards={s: 1 for s in SPLITS})
            raw = raw_items if raw_items is not None else [str(i) for i in range(len(titles))]
            items = pa.table({"id": pa.array(np.arange(len(titles)), pa.int64()),
                              "title": pa.array(titles, pa.string()), "raw_id": pa.array(raw, pa.string())})
            pq.write_table(items, tmp / "items.parquet")
            write_manifest(tmp, manifest)
            relax_modes(tmp)
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    return {**manifest, "complete": True}


def validate_splits(where: object, titles: list[str], splits: dict, L: int, timestamps: bool = True) -> None:
    """Check the row invariants; raise DataError naming ``where``, the split and the first bad row."""
    n = len(titles)
    seen = []
    for split in SPLITS:
        if split not in splits:
            raise DataError(where, f"split {split!r} is missing")
        c = splits[split]
        R = len(c["target"])
        hist, hl, tgt = c["history"], c["history_len"], c["target"]
        if hist.shape != (R, L):
            raise DataError(where, f"{split}: history has shape {hist.shape}, expected ({R}, {L})")
        for k in COLUMNS:
            if len(c[k]) != R:
                raise DataError(where, f"{split}: column {k} has {len(c[k])} rows, expected {R}")
        checks = [
            ((hl < 1) | (hl > L), f"history_len outside 1..{L}"),
            ((tgt < 0) | (tgt >= n), f"target outside 0..{n - 1}"),
        ]
        if R:
            inside = np.arange(L)[None, :] < hl[:, None]
            checks.append(((inside & ((hist < 0) | (hist >= n))).any(1), f"history id outside 0..{n - 1}"))
            checks.append(((~inside & (hist != n)).any(1), f"padding after history_len is not {n}"))
        if timestamps:
            checks.append((c["timestamp"] < 0, "negative timestamp"))
        for bad, problem in checks:
            if np.any(bad):
                r = int(np.argmax(bad))
                raise DataError(where, f"{split}: {problem} (row_id {int(c['row_id'][r])})", row=r)
        seen.append(np.asarray(c["row_id"]))
    allr = np.concatenate(seen) if seen else np.zeros(0)
    if len(np.unique(allr)) != len(allr):
        raise DataError(where, "row_id values are not unique across splits")


def _read_arrow_split(folder: Path, split: str) -> pa.Table:
    state_p = folder / "splits" / split / "state.json"
    try:
        state = json.loads(state_p.read_text(encoding="utf-8"))
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{state_p}: unreadable split state ({exc})") from exc
    tables = []
    for fname in files:
        p = (folder / "splits" / split / fname)
        if Path(fname).name != fname or not p.is_file():
            raise ManifestError(f"{p}: split data file missing or outside the split folder")
        tables.append(read_arrow_stream(p))
    return pa.concat_tables(tables) if tables else pa.table({})


def _to_numpy(table: pa.Table, L: int, where: Path) -> dict[str, np.ndarray]:
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{where}: split lacks column(s) {', '.join(missing)}")
    out = {}
    for c in COLUMNS:
        col = table.column(c).combine_chunks() if table.num_rows else table.column(c)
        if c == "history":
            flat = col.flatten() if table.num_rows else pa.array([], pa.int64())
            out[c] = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int64).reshape(-1, L)
        elif c == "user":
            out[c] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
        else:
            out[c] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)
    return out


def split_columns(path: str | Path, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    """Selected numeric columns of one split straight from its memory-mapped Arrow files.

    For stages that need a few columns of a large dataset (e.g. ``row_id`` and ``target``):
    nothing else is read or converted (``load_dataset`` builds every column, users as Python
    strings). Checks the manifest (complete, schema) and the row count; returns int64 arrays."""
    path = Path(path)
    manifest = read_manifest(path, SCHEMA)
    table = _read_arrow_split(path, split)
    missing = [c for c in columns if c not in table.column_names or c in ("user", "history")]
    if missing:
        raise ManifestError(f"{path}/splits/{split}: no numeric column(s) {', '.join(missing)}")
    if table.num_rows != manifest["counts"].get(split):
        raise ManifestError(f"{path}: split {split} has {table.num_rows} rows, manifest says {manifest['counts'].get(split)}")
    return {c: np.asarray(table.column(c).to_numpy(), dtype=np.int64) for c in columns}


def load_dataset(path: str | Path) -> Dataset:
    """Load and validate a prepared dataset folder; refuses incomplete or inconsistent ones."""
    path = Path(path)
    manifest = read_manifest(path, SCHEMA)
    for key in ("n_items", "padding_id", "max_history", "counts", "id_map_hash"):
        if key not in manifest:
            raise ManifestError(f"{path}/manifest.json: missing key {key!r}")
    items_p = path / "items.parquet"
    if not items_p.is_file():
        raise ManifestError(f"{items_p}: missing")
    items = read_parquet(items_p, columns=["id", "title"])
    ids = items.column("id").to_numpy()
    titles = items.column("title").to_pylist()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DataError(items_p, "item ids are not dense 0..N-1 in order")
    if len(titles) != manifest["n_items"] or manifest["padding_id"] != len(titles):
        raise ManifestError(f"{path}: items.parquet has {len(titles)} items, manifest says {manifest['n_items']}")
    if id_map_hash(titles) != manifest["id_map_hash"]:
        raise ManifestError(f"{path}: id_map_hash of items.parquet does not match the manifest")
    L = int(manifest["max_history"])
    splits = {}
    for split in SPLITS:
        splits[split] = _to_numpy(_read_arrow_split(path, split), L, path / "splits" / split)
        if len(splits[split]["target"]) != manifest["counts"].get(split):
            raise ManifestError(f"{path}: split {split} has {len(splits[split]['target'])} rows, "
                                f"manifest says {manifest['counts'].get(split)}")
    validate_splits(path, titles, splits, L, timestamps=manifest.get("protocol", {}).get("timestamps", True))
    return Dataset(path=path, manifest=manifest, titles=titles, splits=splits)


def prepare_dataset(raw, out: str | Path, *, name: str, domain: dict, params=None, source_kind: str = "") -> dict:
    """Run the protocol on a ``sources.RawLog`` and save it; returns the manifest.

    Source files enter the manifest by base name + sha256 (not by path), so the same input
    prepared from another folder still gives byte-identical output.
    """
    from dllm2rec.data.protocol import ProtocolParams, build_rows

    params = params or ProtocolParams()
    prep = build_rows(raw.interactions, raw.titles, params, source=", ".join(str(f) for f in raw.files))
    sources = [{"file": Path(f).name, "sha256": file_sha256(f)} for f in raw.files]
    protocol = {**params.as_dict(), "timestamps": True, "source_format": source_kind,
                "item_ids": "sorted raw id (numeric when all ids are integers)"}
    return save_dataset(out, name=name, titles=prep.titles, splits=prep.splits, max_history=params.max_history,
                        protocol=protocol, domain=domain, sources=sources, raw_items=prep.raw_items,
                        extra={"stats": prep.stats})
