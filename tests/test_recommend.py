"""``recommend``: same top-k as the evaluator's ranking code, input parsing, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

try:
    import tiny_run
except ImportError:  # tests/ imported as a package
    from tests import tiny_run

from dllm2rec.eval import metrics
from dllm2rec.train.batches import split_tensors
from dllm2rec.cli import main
from dllm2rec.errors import DataError
from dllm2rec.serve.histories import ItemTable, read_histories
from dllm2rec.serve.recommend import load_student, pad_histories, recommend


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # the CI box has 2 cores shared with other jobs
    return tiny_run.make_run(tmp_path_factory.mktemp("rec"), "sasrec", ed=True, steps=60)


@pytest.fixture(scope="module")
def student(run_dir):
    return load_student(run_dir)


def _split_rows(student, split="test"):
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.data.knowledge import load_teacher

    ds = load_dataset(student.config.data.path)
    data = split_tensors(ds.splits[split], student.max_len, ds.padding_id, split)
    table = load_teacher(student.config.distill.teacher, ds).embeddings
    histories = [data.history[r, : data.lengths[r]].tolist() for r in range(len(data))]
    return data, table, histories


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_same_topk_as_evaluator(student, exclude_seen):
    data, llm_table, histories = _split_rows(student)
    # The evaluator's way: encode with the raw teacher table, rank with metrics.topk_items.
    with torch.no_grad():
        h = student.model.encode(data.history, data.lengths, llm_table=llm_table)
    want = metrics.topk_items(h, student.output_weight, student.output_bias, 20,
                              exclude=data.history if exclude_seen else None)
    for method in ("dense", "flat"):
        _, got = recommend(student, histories, 20, exclude_seen=exclude_seen, retrieval=method, batch_size=33)
        assert torch.equal(got, want), method
    # ... and the rank the evaluator gives a target inside the top-k is its position + 1.
    ranks = metrics.rank_of_targets(h, student.output_weight, student.output_bias, data.target,
                                    exclude=data.history if exclude_seen else None)
    pos = (want == data.target[:, None]).float().argmax(1) + 1
    inside = (want == data.target[:, None]).any(1)
    assert inside.any()
    assert torch.equal(ranks[inside], pos[inside])


def test_trained_student_continues_the_walk(student):
    # Users walk ids in steps of 1..3: after 10, 11, 12 the next item is 13.
    _, ids = recommend(student, [[10, 11, 12]], 5)
    assert 13 in ids[0].tolist()


def test_long_history_keeps_most_recent(student):
    long = list(range(20, 40))
    hist, lengths = pad_histories([long, [5]], student.max_len, student.padding_id)
    assert hist[0].tolist() == long[-student.max_len:] and lengths.tolist() == [student.max_len, 1]
    assert hist[1].tolist() == [5] + [student.padding_id] * (student.max_len - 1)
    a = recommend(student, [long], 10)[1]
    b = recommend(student, [long[-student.max_len:]], 10)[1]
    assert torch.equal(a, b)
    # exclude-seen uses the whole given history, not only the part the model reads.
    ex = recommend(student, [long], 10, exclude_seen=True)[1][0].tolist()
    assert not set(ex) & set(long)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_cli_jsonl_titles_and_ids(run_dir, student, tmp_path):
    t = student.titles
    inp = _write(tmp_path / "in.jsonl",
                 json.dumps({"id": "alice", "history": [10, 11, 12]}) + "\n\n"
                 + json.dumps({"history": [t[10], "Spaced Title", 12]}) + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(["recommend", "--checkpoint", str(run_dir), "--input", str(inp), "--output", str(out),
               "--top-k", "7", "--titles", "--scores", "--exclude-seen"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["alice", 3] and [r["line"] for r in rows] == [1, 3]
    want = recommend(student, [[10, 11, 12], [10, 3, 12]], 7, exclude_seen=True)
    for r, row in enumerate(rows):
        assert row["items"] == want[1][r].tolist()
        assert row["titles"] == [t[i] for i in row["items"]]
        assert row["scores"] == sorted(row["scores"], reverse=True) and len(row["scores"]) == 7
        assert torch.allclose(torch.tensor(row["scores"]), want[0][r], atol=1e-5)
    assert not list(tmp_path.glob(".out.jsonl.*"))  # no temp file left behind


def test_cli_csv(run_dir, student, tmp_path):
    inp = _write(tmp_path / "in.csv", 'id,history\nu1,10|11|12\nu2,"Item 20 (2000)|21"\n')
    out = tmp_path / "out.jsonl"
    assert main(["recommend", "--checkpoint", str(run_dir), "--input", str(inp), "--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    want = recommend(student, [[10, 11, 12], [20, 21]], 20)[1]
    assert [r["id"] for r in rows] == ["u1", "u2"]
    assert [r["items"] for r in rows] == want.tolist()


def test_skip_unknown_reports_never_silent(run_dir, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", '{"history": [10, "No Such Game", 999]}\n{"history": ["Nope"]}\n')
    out = tmp_path / "out.jsonl"
    assert main(["recommend", "--checkpoint", str(run_dir), "--input", str(inp), "--output", str(out),
                 "--skip-unknown"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["unknown"] == ["No Such Game", 999] and len(rows[0]["items"]) == 20
    assert rows[1]["items"] == [] and rows[1]["unknown"] == ["Nope"] and "error" in rows[1]
    err = capsys.readouterr().err
    assert "skipped 3 unknown item(s) in 2 row(s)" in err and "line 1" in err


@pytest.mark.parametrize("suffix,text,problem", [
    (".jsonl", '{"history": [1, 2]}\n{"history": [1, 2\n', "row 2: not valid JSON"),
    (".jsonl", '{"history": [1, 2]}\n{"history": [1, "No Such Game"]}\n', "row 2: unknown item 'No Such Game'"),
    (".jsonl", '{"history": [1, 4800]}\n', "row 1: unknown item 4800"),
    (".jsonl", '{"history": []}\n', "row 1: empty history"),
    (".jsonl", '{"items": [1]}\n', "row 1: missing key 'history'"),
    (".jsonl", '[1, 2]\n', "row 1: expected a JSON object"),
    (".jsonl", '{"history": [1, true]}\n', "row 1: item True is neither an id"),
    (".jsonl", '{"history": ["Twin Title"]}\n', "row 1: title 'Twin Title' is ambiguous (ids 7, 8)"),
    (".jsonl", "\n\n", "no histories in the file"),
    (".csv", "id,history\nu1,1|2\nu2,1|2,extra\n", "row 3: expected 2 fields like the header, got 3"),
    (".csv", "id,items\nu1,1|2\n", "row 1: no 'history' column"),
    (".csv", "id,history\nu1,\n", "row 2: empty history"),
    (".csv", "id,history\nu1,1||2\n", "row 2: empty item"),
    (".csv", 'id,history\nu1,"1|2\n', "malformed CSV"),
    (".csv", "id,history\nu1,1|Bogus\n", "row 2: unknown item 'Bogus'"),
    (".txt", '{"history": [1]}\n', "cannot tell the format"),
])
def test_bad_input_names_file_and_line(suffix, text, problem, tmp_path):
    table = ItemTable(tiny_run.titles())
    path = _write(tmp_path / f"in{suffix}", text)
    with pytest.raises(DataError) as exc:
        read_histories(path, table)
    assert str(exc.value).startswith(str(path)) and problem in str(exc.value)


def test_cli_error_exit_and_no_output(run_dir, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", '{"history": [1, "No Such Game"]}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["recommend", "--checkpoint", str(run_dir), "--input", str(inp), "--output", str(out)])
    assert rc == 2 and not out.exists()
    assert f"{inp}: row 1: unknown item 'No Such Game'" in capsys.readouterr().err


def test_item_kinds():
    table = ItemTable(tiny_run.titles())
    assert table.resolve(" Spaced Title ", "auto") == 3 and table.resolve("Spaced Title", "auto") == 3
    assert table.resolve("12", "ids") == 12 and table.resolve(12, "auto") == 12
    assert "not an integer id" in table.resolve("Item 1 (2001)", "ids")
    assert "integer but --items titles" in table.resolve(3, "titles")
    assert table.resolve(48, "auto") is None and table.resolve(-1, "auto") is None


GAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dllm2rec-games"


@pytest.mark.skipif(not (GAMES / "id2name.txt").is_file(), reason="shared reference Games data not present")
def test_real_games_titles_map_back_to_ids(tmp_path):
    import csv

    titles = [""] * 17_408
    for line in (GAMES / "id2name.txt").read_text(encoding="utf-8").splitlines():
        title, _, i = line.rpartition("\t")
        titles[int(i)] = title
    table = ItemTable(titles)
    with open(GAMES / "val_data.csv", encoding="utf-8") as fh:
        rows = [json.loads(r["seq"])[: int(r["len_seq"])] for _, r in zip(range(300), csv.DictReader(fh))]
    ambiguous = {i for i, t in enumerate(titles) if len(table.exact[t]) > 1}
    clean = [h for h in rows if not set(h) & ambiguous]
    dirty = [h for h in rows if set(h) & ambiguous]
    assert clean and dirty  # the real data has both kinds
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps({"history": [titles[i] for i in h]}) + "\n" for h in clean), encoding="utf-8")
    assert [q.items for q in read_histories(ok, table)] == clean
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"history": [titles[i] for i in dirty[0]]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: title .* is ambiguous \(ids "):
        read_histories(bad, table)
    # The ids themselves are never ambiguous.
    bad.write_text(json.dumps({"history": dirty[0]}) + "\n", encoding="utf-8")
    assert read_histories(bad, table)[0].items == dirty[0]


@pytest.mark.slow
def test_real_trainer_run_metrics_match_recommend(tmp_path):
    """End to end: a run written by dllm2rec.train.loop; HR/NDCG@K recomputed from `recommend` output
    (and from the exported artefact) equal the test metrics in its results.json."""
    import math

    from dllm2rec.config import load_config
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.serve.export import export_student, load_exported
    from dllm2rec.train.loop import train

    data = tiny_run.make_dataset(tmp_path)
    teacher = tiny_run.make_teacher(tmp_path, data)
    cfg = load_config(None, [f"data.path={data}", "model.name=sasrec", "model.hidden=16", "model.max_len=5",
                             f"train.output_dir={tmp_path / 'run'}", "train.epochs=2", "train.batch_size=64",
                             "train.progress=false", "eval.ks=[1,5,10,20]", f"distill.teacher={teacher}",
                             "distill.ed.enabled=true", "distill.rd.enabled=true", "distill.rd.k=5"])
    results = train(cfg)
    student = load_student(tmp_path / "run")
    test = load_dataset(data).splits["test"]
    histories = [h[:n].tolist() for h, n in zip(test["history"], test["history_len"])]
    export_student(student, tmp_path / "exported")
    exported = load_exported(tmp_path / "exported")
    for s in (student, exported):
        ids = recommend(s, histories, 20)[1]
        for k in (5, 10, 20):
            hits = [list(row[:k]).index(t) + 1 if t in row[:k] else 0 for row, t in zip(ids.tolist(), test["target"])]
            hr = sum(1 for r in hits if r) / len(hits)
            ndcg = sum(1 / math.log2(r + 1) for r in hits if r) / len(hits)
            assert hr == pytest.approx(results["test"][f"hr@{k}"], abs=1e-9)
            assert ndcg == pytest.approx(results["test"][f"ndcg@{k}"], abs=1e-9)
