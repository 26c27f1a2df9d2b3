"""Raw readers: each format parses; each bad input gives DataError with file + row and no output."""
from __future__ import annotations

import gzip
import json

import pytest

from dllm2rec.cli import main
from dllm2rec.data import sources
from dllm2rec.data.dataset import load_dataset

UDATA = "".join(f"{u}\t{i}\t4\t{100 + 10 * u + i}\n" for u in (1, 2) for i in (1, 2, 3))
UITEM = "1|Toy Story (1995)|x\n2|Caf\xe9 (1996)|x\n3|Heat (1995)|x\n"


def _ml100k(tmp_path, udata=UDATA, uitem=UITEM):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.data").write_text(udata)
    (d / "u.item").write_bytes(uitem.encode("latin-1"))
    return d


def _recbole(tmp_path, inter=None, item=None):
    d = tmp_path / "rb"
    d.mkdir()
    (d / "x.inter").write_bytes((inter or "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                 "7\t1\t3\t881250949\n7\t2\t3\t881250950.0\n7\t3\t3\t881250951\n").encode())
    (d / "x.item").write_bytes(item if isinstance(item, bytes) else (item or
                               "item_id:token\tmovie_title:token_seq\trelease_year:token\n"
                               "1\tToy Story\t1995\n2\tHeat\t1995\n3\tFargo\t\n").encode())
    return d


def _amazon(tmp_path, reviews=None, meta=None, version=2018):
    d = tmp_path / "amz"
    d.mkdir()
    revs = reviews or [json.dumps({"reviewerID": "U1", "asin": a, "unixReviewTime": t})
                       for a, t in (("B1", 5), ("B2", 6), ("B3", 7))]
    if meta is None:
        recs = [{"asin": "B1", "title": "Game One"}, {"asin": "B2", "title": "Game Two"}, {"asin": "B3"}]
        meta = [repr(r) if version == 2014 else json.dumps(r) for r in recs]
    with gzip.open(d / "reviews.json.gz", "wt") as fh:
        fh.write("\n".join(revs) + "\n")
    (d / "meta.json").write_text("\n".join(meta) + "\n")
    return d


def test_ml100k_reader_decodes_latin1(tmp_path):
    raw = sources.read_movielens_100k(_ml100k(tmp_path))
    assert raw.titles["2"] == "Caf\u00e9 (1996)"
    assert len(raw.interactions) == 6 and raw.interactions["timestamp"].dtype == "int64"


def test_movielens_dat_reader(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978300761\n")
    (tmp_path / "movies.dat").write_bytes("10::Les Mis\xe9rables (1995)::Drama\n20::Heat (1995)::Action\n".encode("latin-1"))
    raw = sources.read_movielens_dat(tmp_path)
    assert raw.titles["10"] == "Les Mis\u00e9rables (1995)"
    assert raw.interactions["item"].tolist() == ["10", "20"]


def test_recbole_reader_appends_year_and_accepts_integral_float_time(tmp_path):
    d = _recbole(tmp_path)
    raw = sources.read_recbole(d / "x.inter", d / "x.item")
    assert raw.titles == {"1": "Toy Story (1995)", "2": "Heat (1995)", "3": "Fargo"}
    assert raw.interactions["timestamp"].tolist() == [881250949, 881250950, 881250951]


@pytest.mark.parametrize("version", [2014, 2018])
def test_amazon_readers_drop_untitled_items(tmp_path, version):
    d = _amazon(tmp_path, version=version)
    out = tmp_path / "out"
    rc = main(["data", "prepare", "--source", f"amazon{version}", "--reviews", str(d / "reviews.json.gz"),
               "--meta", str(d / "meta.json"), "--out", str(out)])
    assert rc == 0
    ds = load_dataset(out)
    assert ds.titles == ["Game One", "Game Two"]  # B3 has no title: dropped
    assert ds.manifest["stats"]["items_dropped_untitled"] == 1


def _bad_cases():
    """(id, builder(tmp_path) -> (cli args, file name, line))."""
    def ml(udata=UDATA, uitem=UITEM, line=None, fname="u.data"):
        def build(tmp_path):
            d = _ml100k(tmp_path, udata, uitem)
            return ["--source", "ml-100k", "--input", str(d)], fname, line
        return build

    def rb(inter=None, item=None, line=None, fname="x.inter"):
        def build(tmp_path):
            d = _recbole(tmp_path, inter, item)
            return ["--source", "recbole", "--input", str(d)], fname, line
        return build

    def amz(reviews=None, meta=None, version=2018, line=None, fname="reviews.json.gz"):
        def build(tmp_path):
            d = _amazon(tmp_path, reviews, meta, version)
            return ["--source", f"amazon{version}", "--reviews", str(d / "reviews.json.gz"),
                    "--meta", str(d / "meta.json")], fname, line
        return build

    def dat(ratings, line):
        def build(tmp_path):
            (tmp_path / "ratings.dat").write_text(ratings)
            (tmp_path / "movies.dat").write_text("1::A (1990)::Drama\n")
            return ["--source", "ml-1m", "--input", str(tmp_path)], "ratings.dat", line
        return build

    ok = UDATA.splitlines(keepends=True)
    hdr = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    good_rev = json.dumps({"reviewerID": "U1", "asin": "B1", "unixReviewTime": 5})
    return {
        "ml_malformed_line": ml(udata=ok[0] + ok[1] + "1\t2\n", line=3),
        "ml_non_integer_user": ml(udata=ok[0] + "abc\t1\t3\t100\n", line=2),
        "ml_negative_timestamp": ml(udata=ok[0] + "1\t2\t3\t-5\n", line=2),
        "ml_missing_timestamp": ml(udata=ok[0] + "1\t2\t3\t\n", line=2),
        "ml_fractional_timestamp": ml(udata="1\t2\t3\t12.5\n", line=1),
        "ml_empty_title": ml(uitem="1|Toy Story (1995)|x\n2| |x\n", line=2, fname="u.item"),
        "dat_too_few_fields": dat("1::1::5::10\n1::1::5\n", line=2),
        "recbole_missing_column": rb(inter="user_id:token\titem_id:token\n1\t2\n", line=1),
        "recbole_non_utf8_title": rb(item=b"item_id:token\tmovie_title:token_seq\n1\tCaf\xe9\n", line=2, fname="x.item"),
        "recbole_short_row": rb(inter=hdr + "7\t1\t3\t5\n7\t2\n", line=3),
        "amazon_bad_json": amz(reviews=[good_rev, "{not json"], line=2),
        "amazon_missing_reviewer": amz(reviews=[good_rev, json.dumps({"asin": "B1", "unixReviewTime": 5})], line=2),
        "amazon_missing_time": amz(reviews=[json.dumps({"reviewerID": "U", "asin": "B1"})], line=1),
        "amazon2014_meta_not_literal": amz(meta=["{'asin': 'B1', 'title': 'x'}", "{'asin': __import__('os').getcwd()}"],
                                           version=2014, line=2, fname="meta.json"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_and_row_and_leaves_no_output(case, tmp_path, capsys):
    args, fname, line = BAD[case](tmp_path)
    out = tmp_path / "dataset"
    rc = main(["data", "prepare", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fname in err and f"row {line}:" in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".dataset*"))  # no temp leftovers


def test_failed_prepare_keeps_previous_dataset(tmp_path, capsys):
    good = _ml100k(tmp_path)
    out = tmp_path / "dataset"
    assert main(["data", "prepare", "--source", "ml-100k", "--input", str(good), "--out", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (good / "u.data").write_text("1\t1\t4\tnot-a-time\n")
    assert main(["data", "prepare", "--source", "ml-100k", "--input", str(good), "--out", str(out)]) == 2
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
