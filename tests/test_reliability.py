"""Bad input, one case per line: the error type, a message naming the file / row / problem, and
NOTHING left behind (the test folder holds exactly the same files before and after the call).

Each case is ``builder(tmp, fx) -> act``: the builder writes the bad input under ``tmp`` (a fresh
folder per case) and returns the zero-argument call that must fail. ``fx`` holds the shared, valid
folders (a synthetic dataset, its teacher, a reference ``tocf/`` export and a trained ED student),
which are never modified: a case that corrupts a teacher copies it first.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm2rec.data.dataset import DOMAINS, load_dataset, prepare_dataset, save_dataset
from dllm2rec.errors import ConfigError, DataError, ManifestError
from dllm2rec.data.knowledge import KnowledgeError, load_teacher
from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_splits, synthetic_teacher

N, L, TOP_N, EMB = 20, 5, 5, 6


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rel")
    ds_path = synthetic_dataset(root / "ds", n_items=N, n_train=40, n_valid=10, n_test=10, max_history=L)
    ds = load_dataset(ds_path)
    teacher = synthetic_teacher(root / "teacher", ds, top_n=TOP_N, emb_dim=EMB)
    from dllm2rec.data.reference import export_teacher_tocf

    export_teacher_tocf(teacher, ds, root / "tocf")
    try:
        from tiny_run import make_run
    except ImportError:  # pragma: no cover - collected as a package
        from tests.tiny_run import make_run

    run = make_run(root / "student", model="gru4rec", ed=True, steps=5)
    return SimpleNamespace(root=root, ds_path=ds_path, ds=ds, teacher=teacher, tocf=root / "tocf", run=run)


# ---------------------------------------------------------------- raw logs (data prepare)
UDATA = "".join(f"{u}\t{i}\t4\t{100 + 10 * u + i}\n" for u in (1, 2) for i in (1, 2, 3))
UITEM = "1|Toy Story (1995)|x\n2|Heat (1995)|x\n3|Fargo (1996)|x\n"
INTER_HEAD = "user_id:token\titem_id:token\ttimestamp:float\n"
INTER = INTER_HEAD + "7\t1\t881250949\n7\t2\t881250950\n7\t3\t881250951\n"
ITEM = "item_id:token\tmovie_title:token_seq\n1\tToy Story\n2\tHeat\n3\tFargo\n"
REVIEWS = "".join(json.dumps({"reviewerID": "U1", "asin": a, "unixReviewTime": t}) + "\n"
                  for a, t in (("B1", 5), ("B2", 6), ("B3", 7)))
META = "".join(json.dumps({"asin": a, "title": f"Game {a}"}) + "\n" for a in ("B1", "B2", "B3"))


def _prepare(read, out: Path):
    def act():
        prepare_dataset(read(), out, name="x", domain=DOMAINS["movies"])
    return act


def ml100k(udata=UDATA, uitem=UITEM.encode("latin-1")):
    def build(tmp, fx):
        from dllm2rec.data.sources import read_movielens_100k

        (tmp / "in").mkdir()
        (tmp / "in/u.data").write_text(udata)
        (tmp / "in/u.item").write_bytes(uitem)
        return _prepare(lambda: read_movielens_100k(tmp / "in"), tmp / "out")
    return build


def recbole(inter=INTER, item=ITEM):
    def build(tmp, fx):
        from dllm2rec.data.sources import read_recbole

        (tmp / "x.inter").write_text(inter)
        (tmp / "x.item").write_text(item)
        return _prepare(lambda: read_recbole(tmp / "x.inter", tmp / "x.item"), tmp / "out")
    return build


def amazon(reviews: bytes | str = REVIEWS, meta: bytes | str = META, gz: bool | bytes = True):
    """Amazon 2018 reviews (gzipped unless ``gz`` is False; raw bytes when ``gz`` is bytes) + metadata."""
    def build(tmp, fx):
        from dllm2rec.data.sources import read_amazon

        rev = tmp / ("reviews.json.gz" if gz is not False else "reviews.json")
        data = reviews.encode() if isinstance(reviews, str) else reviews
        rev.write_bytes(gz if isinstance(gz, bytes) else gzip.compress(data) if gz else data)
        (tmp / "meta.json").write_bytes(meta.encode() if isinstance(meta, str) else meta)
        return _prepare(lambda: read_amazon(rev, tmp / "meta.json", 2018), tmp / "out")
    return build


def truncated_gzip() -> bytes:
    return gzip.compress(REVIEWS.encode() * 50)[:-30]


# ---------------------------------------------------------------- reference-format import
def _row(hist, n, nxt):
    return f'"[{", ".join(map(str, hist + [N] * (L - len(hist))))}]",{n},{nxt}.0'


VALID_CSV = "seq,len_seq,next\n" + _row([1, 2], 2, 3) + "\n" + _row([4], 1, 5) + "\n"
ID2NAME = "".join(f"Item {i}\t{i}\n" for i in range(N))


def reference(val=VALID_CSV, test=VALID_CSV, id2name: str | bytes = ID2NAME):
    def build(tmp, fx):
        from dllm2rec.data.reference import import_reference

        d = tmp / "ref"
        d.mkdir()
        (d / "val_data.csv").write_text(val)
        (d / "test_data.csv").write_text(test)
        (d / "id2name.txt").write_bytes(id2name.encode() if isinstance(id2name, str) else id2name)
        return lambda: import_reference(d, tmp / "out", name="r", domain=DOMAINS["games"])
    return build


def bad_csv_row(row: str):
    return reference(val="seq,len_seq,next\n" + _row([1, 2], 2, 3) + "\n" + row + "\n")


# ---------------------------------------------------------------- dataset rows (save_dataset)
def dataset_rows(column: str, row: int, value, protocol=None):
    """A synthetic split with one bad cell, written through save_dataset (which validates first)."""
    def build(tmp, fx):
        splits = synthetic_splits(N, 8, 2, 2, max_history=L)
        c = splits["train"]
        if column == "history_len" and value > L:  # a history longer than configured
            c["history"] = np.concatenate([c["history"], np.full((8, 1), N)], axis=1)
            c["history"][row, :value] = 1
        c[column][row] = value
        return lambda: save_dataset(tmp / "out", name="x", titles=[f"t{i}" for i in range(N)], splits=splits,
                                    max_history=L, protocol=protocol or {}, domain=DOMAINS["games"], sources=[])
    return build


def dataset_file_escape(tmp, fx):
    bad = tmp / "ds"
    shutil.copytree(fx.ds_path, bad)
    state = bad / "splits/train/state.json"
    s = json.loads(state.read_text())
    s["_data_files"][0]["filename"] = "../../../outside.arrow"
    state.write_text(json.dumps(s))
    return lambda: load_dataset(bad)


# ---------------------------------------------------------------- histories (recommend input)
def histories(name: str, content: str | bytes, **kw):
    def build(tmp, fx):
        from dllm2rec.serve.histories import ItemTable, read_histories

        p = tmp / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return lambda: read_histories(p, ItemTable(fx.ds.titles), **kw)
    return build


def recommend_cli(content: str, *flags: str):
    """The recommend command end to end: the error comes before any output is written."""
    def build(tmp, fx):
        from dllm2rec.serve import recommend

        (tmp / "in.jsonl").write_text(content)
        parser = argparse.ArgumentParser()
        recommend.add_arguments(parser)
        args = parser.parse_args(["--checkpoint", str(fx.run), "--input", str(tmp / "in.jsonl"),
                                  "--output", str(tmp / "out.jsonl"), *flags])
        return lambda: recommend.run(args)
    return build


def student_with_teacher_width(width: int):
    """A trained ED student loaded with a teacher whose embedding width differs from training."""
    def build(tmp, fx):
        from dllm2rec.serve.student import load_student

        ds = load_dataset(fx.run.parent / "data")
        synthetic_teacher(tmp / "narrow", ds, top_n=4, emb_dim=width)
        return lambda: load_student(fx.run, teacher=tmp / "narrow")
    return build


# ---------------------------------------------------------------- teacher folders
def teacher_edit(rank=None, manifest=None, emb=None):
    """Copy the valid teacher, apply ``rank(table)``, ``manifest(dict)``, ``emb(tensor)``; load it."""
    def build(tmp, fx):
        t = tmp / "t"
        shutil.copytree(fx.teacher, t)
        if rank:
            pq.write_table(rank(pq.read_table(t / "rank_train.parquet")), t / "rank_train.parquet")
        if manifest:
            m = json.loads((t / "manifest.json").read_text())
            manifest(m)
            (t / "manifest.json").write_text(json.dumps(m))
        if emb:
            e = load_file(str(t / "item_embeddings.safetensors"))["embeddings"]
            save_file({"embeddings": emb(e.clone()).contiguous()}, str(t / "item_embeddings.safetensors"))
        return lambda: load_teacher(t, fx.ds)
    return build


def _set_list(table, name, fn, dtype):
    rows = table.column(name).to_pylist()
    return table.set_column(table.column_names.index(name), name, pa.array(fn(rows), pa.list_(dtype)))


def ids_at(value):
    return lambda t: _set_list(t, "topk_ids", lambda r: [[value] + x[1:] if i == 3 else x for i, x in enumerate(r)], pa.int32())


def ragged(t):
    return _set_list(t, "topk_ids", lambda r: [x[:-1] if i == 2 else x for i, x in enumerate(r)], pa.int32())


def narrow_dist(t):
    return _set_list(t, "topk_dist", lambda r: [x[:-1] for x in r], pa.float32())


def reversed_dist(t):
    return _set_list(t, "topk_dist", lambda r: [x[::-1] if i == 4 else x for i, x in enumerate(r)], pa.float32())


def shift_rows(t):
    return t.set_column(0, "row_id", pa.array(t.column("row_id").to_numpy() + 1000, pa.int64()))


def poke(row, value):
    def fn(e):
        e[row, 1] = value
        return e
    return fn


def tocf_edit(fname: str, fn=None, manifest=None, raw: bytes | None = None):
    def build(tmp, fx):
        t = tmp / "tocf"
        shutil.copytree(fx.tocf, t)
        if raw is not None:
            (t / fname).write_bytes(raw)
        if fn:
            lines = (t / fname).read_text().splitlines()
            (t / fname).write_text("".join(x + "\n" for x in fn(lines)))
        if manifest:
            m = json.loads((t / "manifest.json").read_text())
            manifest(m)
            (t / "manifest.json").write_text(json.dumps(m))
        return lambda: load_teacher(t, fx.ds)
    return build


def tocf_embeddings(tensor_or_obj):
    def build(tmp, fx):
        t = tmp / "tocf"
        shutil.copytree(fx.tocf, t)
        torch.save(tensor_or_obj, t / "all_embeddings.pt")
        return lambda: load_teacher(t, fx.ds)
    return build


class NotATensor:  # a pickled object: weights_only=True must refuse it (never unpickle code)
    def __reduce__(self):
        return (print, ("this would run on load",))


# ---------------------------------------------------------------- configs
def config(*overrides: str, yaml_text: str | None = None):
    def build(tmp, fx):
        from dllm2rec.config import load_config

        path = None
        if yaml_text is not None:
            path = tmp / "run.yaml"
            path.write_text(yaml_text)
        return lambda: load_config(path, list(overrides))
    return build


def train_with(*overrides: str, empty_train: bool = False):
    """The trainer itself: config valid on its own, refused against its inputs; no run folder left."""
    def build(tmp, fx):
        from dllm2rec.config import load_config
        from dllm2rec.train.loop import train

        data = synthetic_dataset(tmp / "ds0", n_items=N, n_train=0, n_valid=4, n_test=4, max_history=L) if empty_train else fx.ds_path
        cfg = load_config(None, [f"data.path={data}", f"distill.teacher={fx.teacher}", f"train.output_dir={tmp / 'run'}",
                                 "model.max_len=5", "train.epochs=1", "train.progress=false", *overrides])
        return lambda: train(cfg)
    return build


def teacher_config(*overrides: str):
    def build(tmp, fx):
        from teacher.config import load_teacher_config

        return lambda: load_teacher_config(None, list(overrides))
    return build


def study(text: str):
    def build(tmp, fx):
        from dllm2rec.studies.experiment import load_study

        (tmp / "study.yaml").write_text(text)
        return lambda: load_study(tmp / "study.yaml")
    return build


STUDY = "dataset: d\nteacher: t\nout: {out}\nseeds: [0]\nstudents: [gru4rec]\n"


def recbole_name(name: str):
    def build(tmp, fx):
        from dllm2rec.compare.recbole_export import export_recbole

        return lambda: export_recbole(fx.ds, tmp / "atomic" / "x", name=name)
    return build


def safe_join_case(rel: str):
    def build(tmp, fx):
        from dllm2rec.atomic import safe_join

        return lambda: safe_join(tmp / "out", rel)
    return build


P = pytest.param
CASES = [
    # malformed CSV / JSON / JSON lines / gzip
    P(bad_csv_row('"[1, 2, 20, 20, 20]",2,3.0,extra'), DataError, r"val_data\.csv: row 3: wrong number of fields", id="csv-extra-field"),
    P(bad_csv_row('"[1, 2, 20, 20, 20],2,3.0'), DataError, r"val_data\.csv: row 3: wrong number of fields", id="csv-unterminated-quote"),
    P(bad_csv_row('"[1, 2, 20, 20",2,3.0'), DataError, r"val_data\.csv: row 3: seq is not a list of ids", id="csv-seq-not-json"),
    P(histories("h.csv", 'history,id\n"1|2"x,7\n'), DataError, r"h\.csv: row \d: malformed CSV", id="csv-histories-strict-quoting"),
    P(histories("h.csv", "history,id\n1|2,7,9\n"), DataError, r"h\.csv: row 2: expected 2 fields like the header, got 3", id="csv-histories-extra-field"),
    P(amazon(reviews='{"reviewerID": "U1", "asin"\n'), DataError, r"reviews\.json\.gz: row 1: not a JSON object", id="json-truncated-object"),
    P(amazon(meta="[1, 2]\n"), DataError, r"meta\.json: row 1: expected an object per line, got list", id="json-not-an-object"),
    P(histories("h.jsonl", '{"history": [1, 2]}\n{"history": [1, 2}\n'), DataError, r"h\.jsonl: row 2: not valid JSON", id="jsonl-malformed"),
    P(histories("h.jsonl", '[1, 2]\n'), DataError, r"h\.jsonl: row 1: expected a JSON object", id="jsonl-not-object"),
    P(amazon(gz=b"this is not gzip data\n"), DataError, r"reviews\.json\.gz: row 1: corrupt or truncated gzip", id="gzip-not-gzip"),
    P(amazon(gz=truncated_gzip()), DataError, r"reviews\.json\.gz: row \d+: corrupt or truncated gzip", id="gzip-truncated"),
    # missing or extra columns
    P(recbole(inter="user_id:token\titem_id:token\n7\t1\n"), DataError, r"x\.inter: row 1: missing column 'timestamp'", id="column-missing-recbole"),
    P(recbole(inter=INTER_HEAD + "7\t1\n"), DataError, r"x\.inter: row 2: expected 3 tab-separated fields, got 2", id="column-short-row-recbole"),
    P(recbole(item="item_id:token\tgenre:token\n1\tx\n"), DataError, r"x\.item: row 1: no title column", id="column-missing-title"),
    P(reference(test="seq,next\n" + '"[1, 20, 20, 20, 20]",3.0\n'), DataError, r"test_data\.csv: row 1: missing column\(s\) len_seq", id="column-missing-reference"),
    P(histories("h.csv", "items,id\n1|2,7\n"), DataError, r"h\.csv: row 1: no 'history' column", id="column-missing-histories"),
    P(histories("h.jsonl", '{"items": [1]}\n'), DataError, r"h\.jsonl: row 1: missing key 'history'", id="key-missing-jsonl"),
    P(teacher_edit(rank=lambda t: t.drop_columns(["topk_dist"])), KnowledgeError, r"rank_train\.parquet: missing column 'topk_dist'", id="column-missing-teacher"),
    P(dataset_file_escape, ManifestError, r"outside the split folder", id="dataset-split-file-escapes"),
    # non-integer or out-of-range item ids
    P(ml100k(udata="1\tx1\t4\t100\n"), DataError, r"u\.data: row 1: item id is not an integer: 'x1'", id="id-not-integer-ml100k"),
    P(bad_csv_row('"[1, ""a"", 20, 20, 20]",2,3.0'), DataError, r"val_data\.csv: row 3: seq is not a list of integer ids", id="id-not-integer-reference"),
    P(bad_csv_row(_row([1], 1, 2).replace("2.0", "2.5")), DataError, r"val_data\.csv: row 3: next is not an integer: '2\.5'", id="id-fractional-reference"),
    P(bad_csv_row(_row([1], 1, N)), DataError, rf"val_data\.csv: row 3: next {N} outside 0\.\.{N - 1}", id="id-out-of-range-reference"),
    P(bad_csv_row(_row([1, -1], 2, 3)), DataError, r"val_data\.csv: row 3: seq ids must be 0\.\.", id="id-negative-reference"),
    P(histories("h.jsonl", '{"history": [1, 999]}\n'), DataError, r"h\.jsonl: row 1: unknown item 999", id="id-out-of-range-histories"),
    P(histories("h.jsonl", '{"history": [1.5]}\n'), DataError, r"h\.jsonl: row 1: item 1\.5 is neither an id", id="id-not-integer-histories"),
    P(histories("h.csv", "history\n1|abc\n", items="ids"), DataError, r"h\.csv: row 2: item 'abc' is not an integer id", id="id-not-integer-histories-csv"),
    P(dataset_rows("target", 3, N), DataError, rf"train: target outside 0\.\.{N - 1}", id="id-out-of-range-dataset"),
    P(teacher_edit(rank=ids_at(N)), KnowledgeError, rf"rank_train\.parquet: row 3: item id {N} at position 0 is outside", id="id-out-of-range-teacher"),
    P(teacher_edit(rank=ids_at(-1)), KnowledgeError, r"rank_train\.parquet: row 3: item id -1 at position 0 is outside", id="id-negative-teacher"),
    P(tocf_edit("myrank_train.txt", lambda x: x[:1] + ["1 2 x 4 5"] + x[2:]), DataError, r"myrank_train\.txt: row 2: not a int", id="id-not-integer-tocf"),
    P(tocf_edit("myrank_train.txt", lambda x: x[:1] + [f"1 2 3 4 {N}"] + x[2:]), DataError, r"myrank_train\.txt: row 2: item id outside", id="id-out-of-range-tocf"),
    # negative or missing timestamps
    P(ml100k(udata="1\t1\t4\t-5\n"), DataError, r"u\.data: row 1: negative timestamp '-5'", id="timestamp-negative"),
    P(ml100k(udata="1\t1\t4\tsoon\n"), DataError, r"u\.data: row 1: timestamp is not a number: 'soon'", id="timestamp-not-a-number"),
    P(ml100k(udata="1\t1\t4\t10.5\n"), DataError, r"u\.data: row 1: timestamp is not a whole number", id="timestamp-fractional"),
    P(ml100k(udata="1\t1\t4\n"), DataError, r"u\.data: row 1: expected at least 4", id="timestamp-field-missing"),
    P(recbole(inter=INTER_HEAD + "7\t1\t \n"), DataError, r"x\.inter: row 2: missing timestamp", id="timestamp-empty"),
    P(amazon(reviews='{"reviewerID": "U1", "asin": "B1"}\n'), DataError, r"reviews\.json\.gz: row 1: missing timestamp", id="timestamp-missing-json"),
    P(dataset_rows("timestamp", 2, -3, {"timestamps": True}), DataError, r"train: negative timestamp", id="timestamp-negative-dataset"),
    # empty histories
    P(histories("h.jsonl", '{"history": []}\n'), DataError, r"h\.jsonl: row 1: empty history", id="history-empty-jsonl"),
    P(histories("h.csv", "history,id\n ,7\n"), DataError, r"h\.csv: row 2: empty history", id="history-empty-csv"),
    P(histories("h.csv", "history\n1||2\n"), DataError, r"h\.csv: row 2: empty item between", id="history-empty-item-csv"),
    P(recommend_cli('{"history": [1]}\n{"history": []}\n'), DataError, r"in\.jsonl: row 2: empty history", id="history-empty-recommend-cli"),
    P(bad_csv_row(_row([], 0, 3)), DataError, rf"val_data\.csv: row 3: len_seq 0 outside 1\.\.{L}", id="history-empty-reference"),
    P(dataset_rows("history_len", 1, 0), DataError, rf"train: history_len outside 1\.\.{L}", id="history-empty-dataset"),
    P(histories("h.jsonl", ""), DataError, r"h\.jsonl: no histories in the file", id="histories-file-empty"),
    # histories longer than configured
    P(bad_csv_row('"[1, 2, 3, 4, 5, 6]",6,3.0'), DataError, rf"val_data\.csv: row 3: seq has 6 ids, expected {L}", id="history-too-long-reference"),
    P(bad_csv_row(_row([1, 2], 2 + L, 3)), DataError, rf"val_data\.csv: row 3: len_seq {L + 2} outside 1\.\.{L}", id="history-len-too-long-reference"),
    P(dataset_rows("history_len", 4, L + 1), DataError, rf"history has shape \(8, {L + 1}\), expected \(8, {L}\)", id="history-too-long-dataset"),
    # titles empty or not UTF-8
    P(ml100k(uitem=b"1|Toy Story (1995)|x\n2||x\n"), DataError, r"u\.item: row 2: empty title for item 2", id="title-empty-ml100k"),
    P(recbole(item="item_id:token\tmovie_title:token_seq\n1\t \n"), DataError, r"x\.item: row 2: empty title for item 1", id="title-empty-recbole"),
    P(reference(id2name="Item 0\t0\n \t1\n"), DataError, r"id2name\.txt: row 2: empty title for item 1", id="title-empty-reference"),
    P(reference(id2name=b"Item 0\t0\nCaf\xe9\t1\n"), DataError, r"id2name\.txt: row 2: not valid utf-8", id="title-not-utf8-reference"),
    P(amazon(meta=b'{"asin": "B1", "title": "Caf\xe9"}\n'), DataError, r"meta\.json: row 1: not valid utf-8", id="title-not-utf8-amazon"),
    P(histories("h.jsonl", b'{"history": ["Caf\xe9"]}\n'), DataError, r"h\.jsonl: not UTF-8 text", id="title-not-utf8-histories"),
    P(histories("h.jsonl", '{"history": ["No Such Title"]}\n'), DataError, r"h\.jsonl: row 1: unknown item 'No Such Title'", id="title-unknown-histories"),
    # teacher files that do not match the dataset: rows, id range (above), width, manifest hash
    P(teacher_edit(rank=lambda t: t.slice(0, 30)), KnowledgeError, r"rank_train\.parquet: has 30 rows but the dataset has 40 training rows", id="teacher-rows-fewer"),
    P(teacher_edit(rank=lambda t: pa.concat_tables([t, t.slice(0, 1)])), KnowledgeError, r"has 41 rows but the dataset has 40", id="teacher-rows-more"),
    P(teacher_edit(rank=shift_rows), KnowledgeError, r"has no teacher row .*another dataset or split", id="teacher-rows-other-split"),
    P(teacher_edit(rank=ragged), KnowledgeError, rf"rank_train\.parquet: row 2: column 'topk_ids' has {TOP_N - 1} entries, expected {TOP_N}", id="teacher-width-ragged"),
    P(teacher_edit(rank=narrow_dist), KnowledgeError, rf"topk_ids width {TOP_N} != topk_dist width {TOP_N - 1}", id="teacher-width-ids-vs-dist"),
    P(teacher_edit(rank=reversed_dist), KnowledgeError, r"rank_train\.parquet: row 4: topk_dist is not ascending", id="teacher-order-reversed"),
    P(teacher_edit(manifest=lambda m: m.update(top_n=TOP_N + 3)), KnowledgeError, rf"topk_ids width {TOP_N} != manifest top_n {TOP_N + 3}", id="teacher-width-vs-manifest"),
    P(teacher_edit(manifest=lambda m: m.update(id_map_hash="0" * 64)), ManifestError, r"manifest\.json: id_map_hash '0000.* differs from the dataset's", id="teacher-manifest-hash"),
    P(teacher_edit(manifest=lambda m: m.update(n_items=N + 1)), ManifestError, rf"n_items {N + 1} != dataset n_items {N}", id="teacher-manifest-n-items"),
    P(teacher_edit(manifest=lambda m: m.update(complete=False)), ManifestError, r"manifest\.json: manifest is not marked complete", id="teacher-manifest-incomplete"),
    P(teacher_edit(manifest=lambda m: m.update(schema="dllm2rec.run/1")), ManifestError, r"schema is 'dllm2rec\.run/1', expected 'dllm2rec\.teacher/1'", id="teacher-manifest-schema"),
    P(tocf_edit("myrank_train.txt", lambda x: x[:-1]), DataError, r"myrank_train\.txt: 39 rows, but the dataset has 40 training rows", id="tocf-rows-fewer"),
    P(tocf_edit("confidence_train.txt", lambda x: x[:4] + [x[4].rsplit(" ", 1)[0]] + x[5:]), DataError, rf"confidence_train\.txt: row 5: {TOP_N - 1} values, expected {TOP_N}", id="tocf-width-ragged"),
    P(tocf_edit("confidence_train.txt", lambda x: x[:1] + ["0.5 0.4 0.6 0.7 0.8"] + x[2:]), DataError, r"confidence_train\.txt: row 2: distances not ascending", id="tocf-distances-unordered"),
    P(tocf_edit("manifest.json", manifest=lambda m: m.update(id_map_hash="f" * 64)), DataError, r"tocf: id_map_hash differs from the dataset's", id="tocf-manifest-hash"),
    P(tocf_embeddings(NotATensor()), DataError, r"all_embeddings\.pt: cannot load as a plain tensor", id="tocf-pickled-object-refused"),
    # embeddings with NaN/Inf or the wrong shape / width
    P(teacher_edit(emb=poke(7, float("nan"))), KnowledgeError, r"item_embeddings\.safetensors: row 7: embedding is NaN or infinite", id="emb-nan"),
    P(teacher_edit(emb=poke(11, float("inf"))), KnowledgeError, r"item_embeddings\.safetensors: row 11: embedding is NaN or infinite", id="emb-inf"),
    P(teacher_edit(emb=lambda e: e[:, :EMB - 2]), KnowledgeError, rf"embedding width {EMB - 2} != manifest emb_dim {EMB}", id="emb-width-vs-manifest"),
    P(teacher_edit(emb=lambda e: e[:-1]), KnowledgeError, rf"embedding table has {N - 1} rows but the dataset has {N} items", id="emb-rows"),
    P(teacher_edit(emb=lambda e: e[0]), KnowledgeError, r"embedding table must be 2-D", id="emb-not-2d"),
    P(tocf_embeddings(torch.full((N, EMB), float("nan"))), DataError, r"all_embeddings\.pt: embeddings contain NaN or Inf", id="emb-nan-tocf"),
    P(tocf_embeddings(torch.zeros(N + 2, EMB)), DataError, rf"{N + 2} item embeddings, but the dataset has {N} items", id="emb-rows-tocf"),
    P(student_with_teacher_width(8), ManifestError, r"teacher embeddings are 8 wide but the student .* was trained with 24-wide", id="emb-width-vs-student"),
    # configs: unknown keys, wrong types, out-of-range values, K > the teacher's top_n
    P(config("train.lrr=0.1"), ConfigError, r"unknown config key\(s\) train\.lrr", id="config-unknown-key"),
    P(config(yaml_text="trian:\n  lr: 0.1\n"), ConfigError, r"run\.yaml: unknown config key\(s\) trian", id="config-unknown-section-yaml"),
    P(config(yaml_text="train: [1, 2\n"), ConfigError, r"run\.yaml: not valid YAML", id="config-malformed-yaml"),
    P(config("train.lr=-0.001"), ConfigError, r"'train\.lr' must be > 0, got -0\.001", id="config-negative-lr"),
    P(config("train.batch_size=0"), ConfigError, r"'train\.batch_size' must be > 0", id="config-zero-batch"),
    P(config("model.dropout=1.5"), ConfigError, r"'model\.dropout' must be in \[0, 1\], got 1\.5", id="config-dropout-range"),
    P(config("distill.rd.lam=-1"), ConfigError, r"'distill\.rd\.lam' must be >= 0", id="config-negative-lambda"),
    P(config("distill.rd.k=0"), ConfigError, r"'distill\.rd\.k' must be > 0", id="config-zero-k"),
    P(config("train.epochs=many"), ConfigError, r"'train\.epochs' must be an integer, got 'many'", id="config-wrong-type"),
    P(config("model.name=bert4rec"), ConfigError, r"'model\.name' = 'bert4rec'; choose one of", id="config-bad-choice"),
    P(config("eval.select_metric=ndcg@7"), ConfigError, r"'eval\.select_metric' = 'ndcg@7'", id="config-metric-not-in-ks"),
    P(config("distill.rd.enabled=true"), ConfigError, r"distillation is enabled but 'distill\.teacher' is empty", id="config-rd-without-teacher"),
    P(train_with("distill.rd.enabled=true", f"distill.rd.k={TOP_N + 1}"), ConfigError, rf"distill\.rd\.k = {TOP_N + 1} exceeds the teacher's top_n = {TOP_N}", id="config-k-above-teacher-top-n"),
    P(train_with(empty_train=True), ConfigError, r"ds0: 0 training rows give no batch", id="config-dataset-without-train-rows"),
    P(teacher_config("generate.decodng=beam"), ConfigError, r"generate\.decodng", id="teacher-config-unknown-key"),
    P(teacher_config("generate.engine=tensorrt"), ConfigError, r"generate\.engine", id="teacher-config-bad-choice"),
    P(study(STUDY.format(out="o") + "variants: [none]\nepochs: 3\n"), ConfigError, r"unknown study key\(s\) \['epochs'\]", id="study-unknown-key"),
    # paths that would escape the output folder
    P(study(STUDY.format(out="o") + "variants: ['../../escaped']\ndefine: {variants: {'../../escaped': []}}\n"), ConfigError, r"variants name '\.\./\.\./escaped' must be a plain folder name", id="path-escape-study-variant"),
    P(study("dataset: d\nteacher: t\nout: o\nstudents: [/tmp/abs]\nvariants: [none]\ndefine: {students: {/tmp/abs: []}}\n"), ConfigError, r"students name '/tmp/abs' must be a plain folder name", id="path-escape-study-student-absolute"),
    P(recbole_name("../../escaped"), DataError, r"dataset name '\.\./\.\./escaped' is not a plain file name", id="path-escape-recbole-dataset-name"),
    P(safe_join_case("../outside"), ManifestError, r"path \.\./outside escapes the output folder", id="path-escape-safe-join-dotdot"),
    P(safe_join_case("/etc/passwd"), ManifestError, r"path /etc/passwd escapes the output folder", id="path-escape-safe-join-absolute"),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("build,error,message", CASES)
def test_bad_input_is_refused_clearly_and_leaves_nothing(build, error, message, fx, tmp_path):
    act = build(tmp_path, fx)
    before = _tree(tmp_path)
    fixtures_before = _tree(fx.root)
    with pytest.raises(error, match=message) as info:
        act()
    after = _tree(tmp_path)
    assert after == before, f"partial output left behind: {sorted(after - before)}"
    assert _tree(fx.root) == fixtures_before  # shared inputs untouched too


def test_every_promised_category_has_a_case():
    """The README promise, category by category: a case must exist for each."""
    ids = [c.id for c in CASES]
    for prefix in ("csv-", "json-", "jsonl-", "gzip-", "column-", "id-not-integer", "id-out-of-range",
                   "timestamp-negative", "timestamp-missing", "history-empty", "history-too-long", "title-empty",
                   "title-not-utf8", "teacher-rows", "teacher-width", "teacher-order", "teacher-manifest-hash", "emb-nan", "emb-inf",
                   "emb-width", "config-unknown-key", "config-negative-lr", "config-k-above-teacher-top-n", "path-escape"):
        assert any(i.startswith(prefix) for i in ids), prefix
