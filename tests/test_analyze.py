"""Overlap diagnostics, RD-weight histogram, latency and curve plots on hand-built fixtures.

The student runs are built by hand: output weight 0 and a chosen bias make every row's top-k
the same known list, so each expected share below can be checked on paper.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dllm2rec.studies.analyze import analyze_overlap, metric_curves, overlap_stats, rd_weight_matrix
from dllm2rec.cli import main
from dllm2rec.errors import DataError
from dllm2rec.studies.latency import teacher_seconds_per_row
from dllm2rec.studies.plots import is_png

N, K, L = 12, 4, 4
TEST_TARGETS = [0, 5, 9, 3]
# teacher top-4 per test row (stored in the file in REVERSED row order: readers align by row_id)
TEACHER_TOP = [[0, 1, 6, 7], [5, 6, 7, 8], [2, 3, 4, 10], [8, 9, 10, 11]]
BEFORE_TOP = [0, 1, 2, 3]  # the "plain" student ranks these first for every row
AFTER_TOP = [0, 5, 6, 7]   # the "distilled" one these


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from dllm2rec.config import dump_config, load_config
    from dllm2rec.data.dataset import DOMAINS, load_dataset, save_dataset
    from dllm2rec.models import build_student
    from dllm2rec.bench.synthetic import synthetic_splits, synthetic_teacher

    root = tmp_path_factory.mktemp("analyze")
    splits = synthetic_splits(N, 40, 4, 4, max_history=L, seed=1)
    splits["test"]["target"] = np.array(TEST_TARGETS, dtype=np.int64)
    save_dataset(root / "ds", name="tiny", titles=[f"Item {i}" for i in range(N)], splits=splits, max_history=L,
                 protocol={"kind": "synthetic"}, domain=DOMAINS["games"], sources=[])
    ds = load_dataset(root / "ds")
    teacher = synthetic_teacher(root / "teacher", ds, top_n=10, emb_dim=4)
    rows = ds.splits["test"]["row_id"][::-1]
    pq.write_table(pa.table({"row_id": pa.array(rows, pa.int64()),
                             "topk_ids": pa.array(TEACHER_TOP[::-1], pa.list_(pa.int32()))}),
                   teacher / "rank_test.parquet")
    runs = {}
    for name, top in (("before", BEFORE_TOP), ("after", AFTER_TOP)):
        cfg = load_config(None, [f"data.path={root / 'ds'}", "model.name=gru4rec", "model.hidden=8",
                                 f"model.max_len={L}", f"train.output_dir={root / name}"])
        model = build_student(cfg.model, N)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["output.weight"].zero_()
        bias = torch.zeros(N)
        bias[top] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # top-k = ``top`` whatever the history
        state["output.bias"] = bias
        (root / name / "best").mkdir(parents=True)
        from safetensors.torch import save_file

        save_file(state, str(root / name / "best/model.safetensors"))
        dump_config(cfg, root / name / "config.yaml")
        runs[name] = root / name
    return root, ds, teacher, runs


def test_overlap_stats_by_hand():
    t = torch.tensor([[1, 2, 3], [6, 7, 8]])
    s = torch.tensor([[3, 4, 5], [6, 7, 9]])
    st = overlap_stats(t, s, torch.tensor([3, 9]))
    assert st["share"] == {"teacher_only": 0.5, "overlap": 0.5, "student_only": 0.5}  # (1 + 2) / 6 shared
    assert st["hit_rate"] == {"teacher_only": 0.0, "overlap": 0.5, "student_only": 0.5}
    assert st["precision"]["overlap"] == pytest.approx(1 / 3) and st["precision"]["student_only"] == pytest.approx(1 / 3)
    assert (st["teacher_hr"], st["student_hr"]) == (0.5, 1.0)
    assert (st["teacher_beats_student"], st["student_beats_teacher"], st["both_hit"], st["neither_hit"]) == (0, 0.5, 0.5, 0)


def test_overlap_on_runs(fx):
    root, _, teacher, runs = fx
    res = analyze_overlap(str(teacher), {k: str(v) for k, v in runs.items()}, "test", K)
    b, a = res["before"], res["after"]
    # before: overlaps 2, 0, 2, 0 of 4 -> 4/16; one row each: both hit / teacher only / neither / student only
    assert b["rows"] == 4 and b["share"]["overlap"] == 0.25 and b["share"]["teacher_only"] == 0.75
    assert b["hit_rate"] == {"teacher_only": 0.25, "overlap": 0.25, "student_only": 0.25}
    assert b["precision"]["overlap"] == 0.25 and b["precision"]["teacher_only"] == pytest.approx(1 / 12)
    assert (b["teacher_beats_student"], b["student_beats_teacher"], b["both_hit"], b["neither_hit"]) == (.25, .25, .25, .25)
    assert (b["teacher_hr"], b["student_hr"]) == (0.5, 0.5)
    # after: overlaps 3, 3, 0, 0 -> 6/16; rows 0 and 1 hit in both lists, rows 2 and 3 nowhere
    assert a["share"]["overlap"] == 6 / 16
    assert a["hit_rate"] == {"teacher_only": 0.0, "overlap": 0.5, "student_only": 0.0}
    assert (a["both_hit"], a["neither_hit"], a["student_hr"]) == (0.5, 0.5, 0.5)


def test_overlap_cli_writes_tables_and_pngs(fx, tmp_path):
    root, _, teacher, runs = fx
    out = tmp_path / "an"
    assert main(["analyze", "overlap", "--teacher", str(teacher), "--before", str(runs["before"]),
                 "--after", str(runs["after"]), "--k", str(K), "--out", str(out)]) == 0
    saved = json.loads((out / "overlap.json").read_text())
    assert saved["runs"]["after"]["share"]["overlap"] == 0.375
    md = (out / "overlap.md").read_text()
    assert "Table 3" in md and "Table 7" in md and "Table 2" in md and "| after | 37.50% |" in md
    for png in ("overlap.png", "part_hits.png"):
        assert is_png(out / png) and (out / png).stat().st_size < 150_000


def test_missing_test_ranking_is_named(fx, tmp_path, capsys):
    root, _, teacher, runs = fx
    assert main(["analyze", "overlap", "--teacher", str(teacher), "--before", str(runs["before"]),
                 "--split", "valid", "--k", str(K), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rank_valid.parquet" in err and "valid ranking" in err
    with pytest.raises(DataError, match="fewer than k"):
        analyze_overlap(str(teacher), {"before": str(runs["before"])}, "test", 5)


def test_rd_weights_histogram(fx, tmp_path):
    root, ds, teacher, runs = fx
    w, note = rd_weight_matrix(str(teacher), str(root / "ds"))
    assert w.shape == (40, 10) and "consistency = 0" in note
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)  # official variant: rows renormalised
    # position and confidence weights both fall with the rank (distances ascend): so does every row
    assert (np.diff(w, axis=1) < 0).all()
    out = tmp_path / "rd"
    assert main(["analyze", "rd-weights", "--teacher", str(teacher), "--dataset", str(root / "ds"),
                 "--run", str(runs["before"]), "--out", str(out)]) == 0
    summary = json.loads((out / "rd_weights.json").read_text())
    assert summary["rows"] == 40 and summary["k"] == 10 and "student top-10" in summary["consistency"]
    assert summary["row_sum_mean"] == pytest.approx(1.0, rel=1e-5)
    assert is_png(out / "rd_weights.png")


def test_latency_from_bench_table(fx, tmp_path, capsys):
    root, _, _, runs = fx
    bench = tmp_path / "bench.md"
    bench.write_text(
        "# Teacher benchmark\n\n| measurement | engine | rows | median s | rows/s | vs reference | engine start s |\n"
        "|---|---|---|---|---|---|---|\n| greedy | vllm | 64 | 32.00 | 2.00 | 2.00x | 10 |\n"
        "| greedy | transformers | 64 | 64.00 | 1.00 | 1.00x (ref) | 5 |\n"
        "| embed | vllm | 128 | 1.28 | 100 | 1x | 3 |\n| ground | faiss-flat | 2048 | 2.048 | 1000 | 2x | - |\n")
    spr, parts = teacher_seconds_per_row(bench)
    assert parts == {"greedy": 0.5, "embed": 0.01, "ground": 0.001} and spr == pytest.approx(0.511)
    (tmp_path / "partial.md").write_text(bench.read_text().replace("| embed |", "| other |"))
    with pytest.raises(DataError, match="embed"):
        teacher_seconds_per_row(tmp_path / "partial.md")
    out = tmp_path / "lat"
    assert main(["analyze", "latency", "--run", str(runs["before"]), "--teacher-bench", str(bench),
                 "--repeats", "2", "--k", str(K), "--out", str(out)]) == 0
    lat = json.loads((out / "latency.json").read_text())
    assert lat["student"]["rows"] == 4 and lat["teacher_seconds_per_row"] == pytest.approx(0.511)
    assert lat["ratio"] == pytest.approx(0.511 / lat["student"]["seconds_per_row"])
    assert "Teacher / student time ratio" in capsys.readouterr().out
    assert main(["analyze", "latency", "--run", str(runs["before"]), "--teacher-seconds-per-row", "1"]) == 2
    assert "1..12" in capsys.readouterr().err  # default k = 20 > 12 items: a clear error


def test_curves_plot(tmp_path):
    runs = []
    for name, vals in (("a", [0.1, 0.2, 0.25]), ("b", [0.05, 0.3])):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "valid": {"ndcg@20": v}}) + "\n"
                                                       for e, v in enumerate(vals)))
        runs.append(str(d))
    series = metric_curves(runs)
    assert [s[1] for s in series.values()] == [[0.1, 0.2, 0.25], [0.05, 0.3]]
    assert main(["analyze", "curves", "--runs", *runs, "--out", str(tmp_path / "c.png")]) == 0
    assert is_png(tmp_path / "c.png")
    Path(runs[1], "metrics.jsonl").write_text('{"epoch": 0, "valid": {}}\n')
    with pytest.raises(DataError, match="row 1"):
        metric_curves(runs)


def test_popularity_ranking_and_hit_rate_by_hand():
    from dllm2rec.studies.teacher_profile import hit_rate, popularity_ranking

    # item 2 x3, item 0 x2, items 1 and 3 x1 (tie: lower id first), item 4 never
    assert popularity_ranking(np.array([2, 0, 2, 1, 3, 2, 0]), 5).tolist() == [2, 0, 1, 3, 4]
    assert hit_rate(np.array([2, 0]), np.array([0, 1, 2, 2])) == 0.75  # one shared list
    assert hit_rate(np.array([[0, 1], [3, 4]]), np.array([1, 1])) == 0.5  # one list per row


def test_teacher_profile_cli(fx, tmp_path):
    root, _, teacher, _ = fx
    table = pq.read_table(teacher / "rank_test.parquet")
    gen = ["Item 0", "Item 5", "Item 5", "not a title"]  # file order (rows reversed)
    pq.write_table(table.append_column("generated", pa.array(gen, pa.string())), tmp_path / "rank_test.parquet")
    out = tmp_path / "profile"
    assert main(["analyze", "teacher", "--teacher", str(tmp_path), "--dataset", str(root / "ds"),
                 "--k", "4", "--out", str(out)]) == 0
    p = json.loads((out / "teacher_profile.json").read_text())
    # TEACHER_TOP hits rows 0 (target 0) and 1 (target 5), misses row 2 (9) and row 3 (3)
    assert p["hr"]["teacher"] == 0.5 and p["hr"]["random"] == 4 / N
    assert p["distinct_generated_texts"] == 3 and p["exact_title_share"] == 0.75
    assert p["distinct_top1_items"] == 4 and p["distinct_topk_lists"] == 4
    assert p["item_coverage_at_k"] == len({i for r in TEACHER_TOP for i in r}) / N
    assert "| teacher | 0.5000 |" in (out / "teacher_profile.md").read_text()
    # a ranking-only teacher (teacher import / from-run: no generated texts) is profiled too
    assert main(["analyze", "teacher", "--teacher", str(teacher), "--dataset", str(root / "ds"),
                 "--k", "4", "--out", str(tmp_path / "x")]) == 0
    q = json.loads((tmp_path / "x" / "teacher_profile.json").read_text())
    assert q["hr"] == p["hr"] and q["distinct_generated_texts"] is None and q["exact_title_share"] is None
    assert "ranking-only teacher" in (tmp_path / "x" / "teacher_profile.md").read_text()


def test_teacher_table_by_hand(fx, tmp_path):
    root, ds, teacher, runs = fx
    out = tmp_path / "tt"
    assert main(["analyze", "teachers", "--teachers", f"t={teacher}", "--before", str(runs["before"]),
                 "--dataset", str(root / "ds"), "--split", "test", "--k", str(K), "--out", str(out)]) == 0
    (row,) = json.loads((out / "teacher_table.json").read_text())
    # teacher hits rows 0 and 1 at position 1; the student rows 0 (position 1) and 3 (position 4)
    assert (row["rows"], row["hr@4"], row["ndcg@4"], row["distinct_items"]) == (4, 0.5, 0.5, 12)
    assert row["overlap_share"] == 0.25 and row["teacher_only_hit_rate"] == 0.25
    assert row["student"]["hr@4"] == 0.5 and row["student"]["ndcg@4"] == pytest.approx((1 + 1 / np.log2(5)) / 4)
    assert "| t | 4 | 0.5000 | 0.5000 | 12 | 25.0% | 25.00% |" in (out / "teacher_table.md").read_text()
    assert main(["analyze", "teachers", "--teachers", "nolabel", "--before", str(runs["before"]),
                 "--dataset", str(root / "ds"), "--split", "test", "--out", str(out)]) == 2


def test_teacher_table_says_which_teachers_carry_collaborative_information(tmp_path):
    from dllm2rec.studies.teacher_table import _collaborative

    cases = {
        "llm_plain": ({"collaborative": False, "source": {"kind": "llm"}}, "no"),
        "llm_cooc": ({"collaborative": True, "collab": {"kind": "cooc", "gamma": 4.0}}, "yes (cooc, gamma 4.0)"),
        "from_run": ({"source": {"kind": "from-run"}}, "yes (trained on the interactions)"),
        "ensemble": ({"source": {"kind": "from-run-ensemble"}}, "yes (trained on the interactions)"),
        "imported": ({"source": {"kind": "import"}}, "? (imported: not declared)"),
    }
    for name, (manifest, expected) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        assert _collaborative(tmp_path / name) == expected, name
    assert _collaborative(tmp_path / "missing") == "?"
