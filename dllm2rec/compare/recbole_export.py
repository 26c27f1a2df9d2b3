"""Export a prepared dataset split to RecBole 1.2.1 "benchmark" atomic files.

``export_recbole(ds, folder) -> dict`` writes, for a dataset named ``name``:

- ``<name>.train.inter`` / ``<name>.valid.inter`` / ``<name>.test.inter``: header
  ``session_id:token<TAB>item_id_list:token_seq<TAB>item_id:token``, then exactly one line per
  dataset row in split order: the row's ``row_id``, its history WITHOUT padding (oldest first,
  space separated) and its target. Item tokens are our dense ids ``0..N-1`` as decimal strings.
- ``<name>.item``: header ``item_id:token`` and every id ``0..N-1``. RecBole only knows items it
  sees in some file; listing all of them here makes its full ranking cover all N items even
  when an item never occurs in any row (RecBole adds its own ``[PAD]`` as internal id 0).
- ``manifest.json`` (schema ``dllm2rec.recbole_export/1``, written last): name, n_items,
  counts, the dataset's ``id_map_hash`` and path.

RecBole must be configured with ``benchmark_filename: [train, valid, test]`` and
``alias_of_item_id: [item_id_list]`` (see ``launch/recbole/base.yaml``): the first makes it
train / validate / test on these rows as they are (no re-split, no augmentation); the second
makes history tokens and target tokens share one remapping (without it RecBole remaps the
history column separately and the model silently sees different ids).

The whole folder is built in a temporary sibling and renamed into place (``atomic_dir``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest
from dllm2rec.errors import DataError

SCHEMA = "dllm2rec.recbole_export/1"
SPLITS = ("train", "valid", "test")
INTER_HEADER = "session_id:token\titem_id_list:token_seq\titem_id:token"
ITEM_HEADER = "item_id:token"


def inter_lines(split: dict[str, np.ndarray], n_items: int, where: str) -> list[str]:
    """One ``row_id<TAB>history<TAB>target`` line per row; validates ids (DataError names the row)."""
    row_id, hist, hl, tgt = split["row_id"], split["history"], split["history_len"], split["target"]
    L = hist.shape[1]
    lines = []
    for r in range(len(tgt)):
        n = int(hl[r])
        if not 1 <= n <= L:
            raise DataError(where, f"history_len {n} outside 1..{L} (row_id {int(row_id[r])})", row=r)
        h = hist[r, :n]
        if (h < 0).any() or (h >= n_items).any() or not 0 <= tgt[r] < n_items:
            raise DataError(where, f"item id outside 0..{n_items - 1} (row_id {int(row_id[r])})", row=r)
        lines.append(f"{int(row_id[r])}\t{' '.join(map(str, h.tolist()))}\t{int(tgt[r])}")
    return lines


def export_recbole(ds, folder: str | Path, name: str | None = None) -> dict:
    """Write the RecBole benchmark files of ``ds`` (a ``dllm2rec.data.dataset.Dataset``) to ``folder``.

    ``folder`` should be ``<data_path>/<name>`` because RecBole reads
    ``<data_path>/<name>/<name>.<split>.inter``. Returns the written manifest.
    """
    folder = Path(folder)
    name = name or folder.name
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        # the name comes from the dataset manifest: it must not make a file escape the folder
        raise DataError(folder, f"dataset name {name!r} is not a plain file name (no '/', '\\', '..')")
    n_items = int(ds.manifest["n_items"])
    counts = {}
    with atomic_dir(folder) as tmp:
        for split in SPLITS:
            lines = inter_lines(ds.splits[split], n_items, f"{ds.path} [{split}]")
            counts[split] = len(lines)
            (tmp / f"{name}.{split}.inter").write_text(
                INTER_HEADER + "\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
        (tmp / f"{name}.item").write_text(
            ITEM_HEADER + "\n" + "".join(f"{i}\n" for i in range(n_items)), encoding="utf-8")
        manifest = {"schema": SCHEMA, "name": name, "n_items": n_items, "counts": counts,
                    "id_map_hash": ds.manifest["id_map_hash"], "dataset": str(ds.path),
                    "max_history": int(ds.manifest["max_history"])}
        write_manifest(tmp, manifest)
    return {**manifest, "complete": True}


def read_export(folder: str | Path) -> dict:
    """The manifest of a complete export folder (refuses an incomplete one)."""
    return read_manifest(folder, SCHEMA)
