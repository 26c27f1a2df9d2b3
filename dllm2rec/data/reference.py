"""The reference-code ("official") format: import, export, and teacher ``tocf/`` files.

Layout of ``data/<name>/`` (SPEC section 1):
- ``val_data.csv`` / ``test_data.csv``: columns ``seq`` (a string like ``"[1, 2, 17408]"``: L ids
  right-padded with N), ``len_seq``, ``next`` (written by the reference as a float, ``16713.0``).
  ``seq`` is parsed with ``json.loads`` (never ``eval``).
- ``train_data.df``, ``data_statis.df``: pandas PICKLES. Unpickling runs code, so they are read
  only with ``trust_pickle=True`` (CLI ``--trust-pickle``), with a warning. ``data_statis``
  (``seq_size``, ``item_num``) is inferred from the CSVs and ``id2name.txt`` when not trusted.
  A present but untrusted ``train_data.df`` is refused unless ``skip_train=True``; without it
  the train split is empty and the manifest says ``"train_source": "absent"`` (or ``"skipped"``).
- ``id2name.txt``: one ``title<TAB>id`` line per item (the layout of the published Games file,
  checked: 17,408 lines, ids 0..17407 in order, no trailing newline). ``id<TAB>title`` is
  detected and accepted too. Titles are whitespace-normalised (342 Games titles start with a
  space); HTML entities such as ``&#39;`` are kept as published.

Imported rows have no users or timestamps: ``user`` is ``""`` and ``timestamp`` is -1
(manifest ``protocol.timestamps = false``). Row ids: train rows first, ordered by their
``train_data.df`` index label (row_id = label, which is what ``tocf`` files are aligned to),
then valid, then test, in file order.

``tocf/<name>/``: ``all_embeddings.pt`` (a plain float tensor [N, d], ``torch.save``),
``myrank_train.txt`` and ``confidence_train.txt`` ([R_train, top_n] whitespace-separated ids,
nearest first, and their un-squared L2 distances). Row r belongs to train row_id r.
"""
from __future__ import annotations

import csv
import json
import math
import numbers
import warnings
from pathlib import Path

import numpy as np

from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest
from dllm2rec.data.dataset import Dataset, file_sha256, relax_modes, save_dataset
from dllm2rec.data.protocol import PLACEHOLDER_TITLES, SPLITS
from dllm2rec.data.sources import iter_lines
from dllm2rec.errors import DataError

CSV_FILES = {"valid": "val_data.csv", "test": "test_data.csv"}
TOCF_SCHEMA = "dllm2rec.tocf/1"


def read_id2name(path: Path) -> list[str]:
    """Titles in id order from ``title<TAB>id`` (or ``id<TAB>title``) lines; ids must be 0..N-1."""
    by_id: dict[int, str] = {}
    layout = None
    for lineno, line in iter_lines(path):
        a, sep, b = line.rpartition("\t")
        if not sep:
            raise DataError(path, "expected 'title<TAB>id'", row=lineno)
        if layout is None:
            layout = "title_id" if b.strip().isdigit() else "id_title"
        if layout == "id_title":
            a, _, b = line.partition("\t")
            a, b = b, a
        if not b.strip().isdigit():
            raise DataError(path, f"item id is not a non-negative integer: {b!r}", row=lineno)
        # Ids are fixed by the reference split, so a placeholder title ("None": 19 items in the
        # published Games file) is kept as is; only an empty title is an error.
        i, title = int(b), " ".join(a.split())
        if not title:
            raise DataError(path, f"empty title for item {i}", row=lineno)
        if i in by_id:
            raise DataError(path, f"duplicate item id {i}", row=lineno)
        by_id[i] = title
    if not by_id:
        raise DataError(path, "no items")
    if sorted(by_id) != list(range(len(by_id))):
        missing = sorted(set(range(len(by_id))) - set(by_id))[:5]
        raise DataError(path, f"item ids are not dense 0..{len(by_id) - 1} (missing e.g. {missing})")
    return [by_id[i] for i in range(len(by_id))]


def _int_field(value: object, path: Path, row: int, what: str) -> int:
    """An integer, or an integral float / float string as the reference writes ``next``."""
    try:
        f = float(value) if isinstance(value, str) else value
        if isinstance(f, bool) or not math.isfinite(f) or int(f) != f:
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(path, f"{what} is not an integer: {value!r}", row=row) from None
    return int(f)


def _seq(value: object, path: Path, row: int) -> list[int]:
    seq = value
    if isinstance(value, str):
        try:
            seq = json.loads(value)  # "[1, 2, 17408]" is valid JSON; no eval
        except json.JSONDecodeError as exc:
            raise DataError(path, f"seq is not a list of ids: {exc.msg}", row=row) from None
    if hasattr(seq, "tolist"):
        seq = seq.tolist()
    if not isinstance(seq, list) or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in seq):
        raise DataError(path, f"seq is not a list of integer ids: {str(value)[:60]!r}", row=row)
    return [int(x) for x in seq]


def _rows(records, path: Path, n_items: int, width: int | None):
    """(history [R, L], history_len [R], target [R], L) from (row, seq, len_seq, next) records."""
    hist, lens, tgts = [], [], []
    for row, seq_v, len_v, next_v in records:
        seq = _seq(seq_v, path, row)
        width = len(seq) if width is None else width
        if len(seq) != width:
            raise DataError(path, f"seq has {len(seq)} ids, expected {width}", row=row)
        n = _int_field(len_v, path, row, "len_seq")
        t = _int_field(next_v, path, row, "next")
        if not 1 <= n <= width:
            raise DataError(path, f"len_seq {n} outside 1..{width}", row=row)
        if not 0 <= t < n_items:
            raise DataError(path, f"next {t} outside 0..{n_items - 1}", row=row)
        if any(not 0 <= x < n_items for x in seq[:n]) or any(x != n_items for x in seq[n:]):
            raise DataError(path, f"seq ids must be 0..{n_items - 1} for the first len_seq={n} "
                            f"entries and padding {n_items} after them", row=row)
        hist.append(seq), lens.append(n), tgts.append(t)
    L = width or 0
    return (np.array(hist, dtype=np.int64).reshape(len(hist), L), np.array(lens, dtype=np.int64),
            np.array(tgts, dtype=np.int64), width)


def _csv_records(path: Path):
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("seq", "len_seq", "next") if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(path, f"missing column(s) {', '.join(missing)}", row=1)
            for rec in reader:
                if rec.get("seq") is None or rec.get("next") is None or None in rec:
                    raise DataError(path, "wrong number of fields", row=reader.line_num)
                yield reader.line_num, rec["seq"], rec["len_seq"], rec["next"]
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8: {exc.reason}") from None
    except csv.Error as exc:
        raise DataError(path, f"malformed CSV: {exc}") from None


def _read_pickle(path: Path):
    import pandas as pd

    warnings.warn(f"unpickling {path}: this runs code from the file; do it only for files you trust",
                  stacklevel=3)
    return pd.read_pickle(path)


def read_reference(folder: str | Path, *, trust_pickle: bool = False, skip_train: bool = False) -> dict:
    """Parse a reference ``data/<name>/`` folder into titles, splits and provenance (see module doc)."""
    folder = Path(folder)
    titles = read_id2name(folder / "id2name.txt")
    n = len(titles)
    files = [folder / "id2name.txt"]
    splits, width = {}, None
    for split, fname in CSV_FILES.items():
        hist, lens, tgts, width = _rows(_csv_records(folder / fname), folder / fname, n, width)
        splits[split] = {"history": hist, "history_len": lens, "target": tgts}
        files.append(folder / fname)
    train_p, statis_p = folder / "train_data.df", folder / "data_statis.df"
    train_source = "skipped" if train_p.exists() and skip_train else "absent"
    if train_p.exists() and not skip_train:
        if not trust_pickle:
            raise DataError(train_p, "is a pandas pickle, which can run code when loaded; pass "
                            "--trust-pickle if you trust it (or --skip-train to import valid/test only)")
        df = _read_pickle(train_p)
        if not hasattr(df, "columns") or not {"seq", "len_seq", "next"} <= set(df.columns):
            raise DataError(train_p, "expected a DataFrame with columns seq, len_seq, next")
        labels = np.asarray(df.index)
        if labels.dtype.kind not in "iu" or not np.array_equal(np.sort(labels), np.arange(len(df))):
            raise DataError(train_p, "index labels must be a permutation of 0..R-1 (tocf rows are aligned to them)")
        df = df.sort_index()
        recs = zip(df.index.tolist(), df["seq"].tolist(), df["len_seq"].tolist(), df["next"].tolist())
        hist, lens, tgts, width = _rows(recs, train_p, n, width)
        splits["train"] = {"history": hist, "history_len": lens, "target": tgts}
        files.append(train_p)
        train_source = "train_data.df"
    else:
        L = width or 10
        splits["train"] = {"history": np.zeros((0, L), np.int64), "history_len": np.zeros(0, np.int64),
                           "target": np.zeros(0, np.int64)}
    statis = {"seq_size": width, "item_num": n, "source": "inferred"}
    if statis_p.exists() and trust_pickle:
        sdf = _read_pickle(statis_p)
        try:
            seq_size, item_num = int(sdf["seq_size"].iloc[0]), int(sdf["item_num"].iloc[0])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise DataError(statis_p, f"expected columns seq_size, item_num ({exc})") from None
        if (seq_size, item_num) != (width, n):
            raise DataError(statis_p, f"says seq_size={seq_size}, item_num={item_num}; files give {width}, {n}")
        statis["source"] = "data_statis.df"
        files.append(statis_p)
    if width is None:
        raise DataError(folder, "val_data.csv and test_data.csv hold no rows: cannot infer seq_size")
    start = 0
    for split in SPLITS:  # train, valid, test: row ids follow that order
        c = splits[split]
        R = len(c["target"])
        c["history"] = c["history"].reshape(R, width)  # empty splits read before the width was known
        c.update(row_id=np.arange(start, start + R, dtype=np.int64), user=np.array([""] * R, dtype=object),
                 timestamp=np.full(R, -1, dtype=np.int64))
        start += R
    statis["placeholder_titles"] = sum(t.lower() in PLACEHOLDER_TITLES for t in titles)
    return {"titles": titles, "splits": splits, "max_history": width, "statis": statis,
            "train_source": train_source, "files": files}


def import_reference(folder: str | Path, out: str | Path, *, name: str, domain: dict,
                     trust_pickle: bool = False, skip_train: bool = False) -> dict:
    ref = read_reference(folder, trust_pickle=trust_pickle, skip_train=skip_train)
    protocol = {"source_format": "reference", "timestamps": False, "max_history": ref["max_history"],
                "train_source": ref["train_source"], "data_statis": ref["statis"]["source"],
                "placeholder_titles": ref["statis"]["placeholder_titles"]}
    sources = [{"file": p.name, "sha256": file_sha256(p)} for p in ref["files"]]
    return save_dataset(out, name=name, titles=ref["titles"], splits=ref["splits"],
                        max_history=ref["max_history"], protocol=protocol, domain=domain, sources=sources,
                        extra={"train_source": ref["train_source"]})


def _csv_text(c: dict) -> str:
    lines = ["seq,len_seq,next"]
    for h, n, t in zip(c["history"].tolist(), c["history_len"].tolist(), c["target"].tolist()):
        lines.append(f'"[{", ".join(map(str, h))}]",{n},{t}.0')  # float `next`, as published
    return "\n".join(lines) + "\n"


def export_reference(ds: Dataset, out: str | Path, *, write_pickle: bool = False) -> list[str]:
    """Write ``ds`` in the reference layout (CSVs + id2name.txt; pickles only if asked)."""
    written = []
    with atomic_dir(out) as tmp:
        for split, fname in {**CSV_FILES, "train": "train_data.csv"}.items():
            (tmp / fname).write_text(_csv_text(ds.splits[split]), encoding="utf-8")
            written.append(fname)
        (tmp / "id2name.txt").write_text("\n".join(f"{t}\t{i}" for i, t in enumerate(ds.titles)), encoding="utf-8")
        written.append("id2name.txt")
        if write_pickle:
            import pandas as pd

            tr = ds.splits["train"]
            order = np.argsort(tr["row_id"], kind="stable")
            pd.DataFrame({"seq": [list(map(int, h)) for h in tr["history"][order]],
                          "len_seq": tr["history_len"][order], "next": tr["target"][order]}
                         ).to_pickle(tmp / "train_data.df")
            pd.DataFrame({"seq_size": [ds.max_history], "item_num": [ds.n_items]}).to_pickle(tmp / "data_statis.df")
            written += ["train_data.df", "data_statis.df"]
        write_manifest(tmp, {"schema": "dllm2rec.reference-export/1", "dataset": ds.manifest.get("name"),
                             "id_map_hash": ds.id_map_hash, "n_items": ds.n_items, "files": written})
        relax_modes(tmp)
    return written


def write_tocf(folder: str | Path, embeddings, ids: np.ndarray, dist: np.ndarray, *,
               id_map_hash_: str | None = None) -> None:
    """Write ``all_embeddings.pt`` / ``myrank_train.txt`` / ``confidence_train.txt`` atomically.

    ``embeddings`` [N, d] (tensor or array), ``ids`` int [R, top_n], ``dist`` float [R, top_n].
    """
    import torch

    emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    ids, dist = np.asarray(ids), np.asarray(dist, dtype=np.float32)
    if emb.ndim != 2 or ids.ndim != 2 or ids.shape != dist.shape:
        raise DataError(folder, f"bad shapes: embeddings {tuple(emb.shape)}, ids {ids.shape}, dist {dist.shape}")
    with atomic_dir(folder) as tmp:
        torch.save(emb.detach().cpu().contiguous().clone(), tmp / "all_embeddings.pt")
        (tmp / "myrank_train.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in ids.tolist()))
        (tmp / "confidence_train.txt").write_text(
            "".join(" ".join(f"{x:.9g}" for x in r) + "\n" for r in dist.tolist()))
        write_manifest(tmp, {"schema": TOCF_SCHEMA, "n_items": int(emb.shape[0]), "emb_dim": int(emb.shape[1]),
                             "rows": int(ids.shape[0]), "top_n": int(ids.shape[1]), "id_map_hash": id_map_hash_})
        relax_modes(tmp)


def _read_matrix(path: Path, n_rows: int, dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(path, "file not found")
    rows, width = [], None
    for lineno, line in iter_lines(path):
        parts = line.split()
        width = len(parts) if width is None else width
        if len(parts) != width:
            raise DataError(path, f"{len(parts)} values, expected {width} like the first line", row=lineno)
        try:
            rows.append([dtype(x) for x in parts])
        except ValueError:
            raise DataError(path, f"not a {dtype.__name__}: {line[:60]!r}", row=lineno) from None
    if len(rows) != n_rows:
        raise DataError(path, f"{len(rows)} rows, but the dataset has {n_rows} training rows")
    return np.array(rows, dtype=np.int64 if dtype is int else np.float32).reshape(n_rows, width or 0)


def read_tocf(folder: str | Path, n_train_rows: int, *, n_items: int | None = None,
              expected_id_map_hash: str | None = None):
    """Read and validate a reference ``tocf/<name>/`` folder.

    Returns ``(ids int64 [R, top_n], dist float32 [R, top_n], embeddings torch.Tensor [N, d])``.
    Checks: row counts == ``n_train_rows``, equal widths, ids in 0..N-1 (N = ``n_items`` or the
    embedding rows, which must agree), finite non-negative distances ascending per row
    (nearest first), finite float embeddings; ``id_map_hash`` when the folder has our manifest.
    """
    import torch

    folder = Path(folder)
    if (folder / "manifest.json").exists() and expected_id_map_hash is not None:
        got = read_manifest(folder, TOCF_SCHEMA).get("id_map_hash")
        if got is not None and got != expected_id_map_hash:
            raise DataError(folder, "id_map_hash differs from the dataset's: the teacher used another item table")
    emb_p = folder / "all_embeddings.pt"
    if not emb_p.is_file():
        raise DataError(emb_p, "file not found")
    try:
        emb = torch.load(emb_p, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors/containers
        raise DataError(emb_p, f"cannot load as a plain tensor ({type(exc).__name__}: {exc})") from None
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        raise DataError(emb_p, "expected a 2-D float tensor [N, d]")
    if not torch.isfinite(emb).all():
        raise DataError(emb_p, "embeddings contain NaN or Inf")
    N = emb.shape[0] if n_items is None else n_items
    if emb.shape[0] != N:
        raise DataError(emb_p, f"{emb.shape[0]} item embeddings, but the dataset has {N} items")
    ids = _read_matrix(folder / "myrank_train.txt", n_train_rows, int)
    dist = _read_matrix(folder / "confidence_train.txt", n_train_rows, float)
    if ids.shape != dist.shape:
        raise DataError(folder, f"myrank {ids.shape} and confidence {dist.shape} differ in shape")
    checks = [((ids < 0) | (ids >= N)).any(1), ~np.isfinite(dist).all(1) | (dist < 0).any(1),
              (np.diff(dist, axis=1) < -1e-5 * (1 + np.abs(dist[:, 1:]))).any(1) if dist.shape[1] > 1
              else np.zeros(len(dist), bool)]
    names = [("myrank_train.txt", f"item id outside 0..{N - 1}"),
             ("confidence_train.txt", "distance negative, NaN or Inf"),
             ("confidence_train.txt", "distances not ascending (nearest first)")]
    for bad, (fname, problem) in zip(checks, names):
        if bad.any():
            raise DataError(folder / fname, problem, row=int(np.argmax(bad)) + 1)
    return ids, dist, emb


def export_teacher_tocf(teacher: str | Path, ds: Dataset, out: str | Path) -> None:
    """Convert a project teacher folder (``dllm2rec.teacher/1``) to ``tocf/<name>/`` for ``ds``."""
    from dllm2rec.readers import read_parquet, read_safetensors

    teacher = Path(teacher)
    man = read_manifest(teacher, "dllm2rec.teacher/1")
    if man.get("id_map_hash") != ds.id_map_hash:
        raise DataError(teacher, "id_map_hash differs from the dataset's: the teacher used another item table")
    emb = read_safetensors(teacher / "item_embeddings.safetensors", "np")["embeddings"]
    tab = read_parquet(teacher / "rank_train.parquet", columns=["row_id", "topk_ids", "topk_dist"])
    row_id = tab.column("row_id").to_numpy()
    order = np.argsort(row_id, kind="stable")
    if not np.array_equal(row_id[order], ds.splits["train"]["row_id"]):
        raise DataError(teacher / "rank_train.parquet", "row ids do not match the dataset's training rows")
    ids = np.array(tab.column("topk_ids").to_pylist(), dtype=np.int64)[order]
    dist = np.array(tab.column("topk_dist").to_pylist(), dtype=np.float32)[order]
    write_tocf(out, emb.astype(np.float32), ids, dist, id_map_hash_=ds.id_map_hash)
