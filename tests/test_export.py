"""Exported artefact: self-contained, loads with plain torch, reproduces the training code's top-k."""
from __future__ import annotations

import json
import subprocess
import sys
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
from dllm2rec.data.dataset import load_dataset
from dllm2rec.serve.export import load_exported
from dllm2rec.serve.recommend import load_student, recommend

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model,ed", [("sasrec", True), ("gru4rec", False), ("caser", True)])
def test_export_reproduces_topk(model, ed, tmp_path):
    torch.set_num_threads(1)
    run = tiny_run.make_run(tmp_path, model, ed=ed, steps=8)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["model"] == model and manifest["ed"]["enabled"] is ed
    assert manifest["metrics"]["protocol"] == "synthetic test run"  # results.json travels along
    assert manifest["config"]["model"]["max_len"] == tiny_run.MAX_LEN
    # The wide teacher table is not in the artefact (only the projected one, H = 16 wide).
    assert sum(p.stat().st_size for p in out.iterdir()) < 200_000

    student = load_student(run)
    exported = load_exported(out)
    assert exported.titles == student.titles
    ds = load_dataset(student.config.data.path)
    data = split_tensors(ds.splits["test"], tiny_run.MAX_LEN, ds.padding_id, "test")
    histories = [data.history[r, : data.lengths[r]].tolist() for r in range(len(data))]
    # Reference: the training-side path (raw teacher table when ED) + metrics.topk_items.
    kw = {}
    if ed:
        from dllm2rec.data.knowledge import load_teacher

        kw["llm_table"] = load_teacher(student.config.distill.teacher, ds).embeddings
    with torch.no_grad():
        h = student.model.encode(data.history, data.lengths, **kw)
    for exclude in (False, True):
        want = metrics.topk_items(h, student.output_weight, student.output_bias, 10,
                                  exclude=data.history if exclude else None)
        got = exported.topk(histories, 10, exclude_seen=exclude)[1]
        assert torch.equal(got, want)
        assert torch.equal(recommend(exported, histories, 10, exclude, retrieval="flat")[1], want)
    # Batch size is dynamic in the exported program: one row alone gives the same answer.
    assert torch.equal(exported.topk(histories[:1], 10)[1], exported.topk(histories, 10)[1][:1])


def test_exported_folder_serves_recommend_and_plain_python(tmp_path):
    torch.set_num_threads(1)
    run = tiny_run.make_run(tmp_path, "gru4rec", ed=False, steps=8)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"history": [1, 2, 3]}\n')
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["recommend", "--checkpoint", str(run), "--input", str(inp), "--output", str(a)]) == 0
    assert main(["recommend", "--checkpoint", str(out), "--input", str(inp), "--output", str(b)]) == 0
    assert a.read_text() == b.read_text()
    # The loader needs torch only: no dllm2rec model code is imported to run the artefact.
    code = ("import sys, torch; from dllm2rec.serve.export import load_exported; "
            f"s = load_exported({str(out)!r}); print(s.topk([[1, 2, 3]], 20)[1][0].tolist()); "
            "print(sorted(m for m in sys.modules if m.startswith('dllm2rec')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ids_line, mods_line = res.stdout.strip().splitlines()[-2:]
    assert json.loads(ids_line) == json.loads(a.read_text())["items"]
    assert mods_line == str(["dllm2rec", "dllm2rec.serve", "dllm2rec.serve.export"])


def test_altered_artefact_is_refused(tmp_path):
    torch.set_num_threads(1)
    run = tiny_run.make_run(tmp_path, "gru4rec", ed=False, steps=2)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    with open(out / "items.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": 48, "title": "extra"}\n')
    with pytest.raises(ValueError, match="sha256 differs"):
        load_exported(out)
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_exported(out)
