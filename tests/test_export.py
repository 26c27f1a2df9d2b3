"""Exported artefact: safetensors + architecture, no pickle, no training stack; reproduces the training top-k."""
from __future__ import annotations

import json
import shutil
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
from dllm2rec.errors import DataError, ManifestError
from dllm2rec.serve.export import load_exported
from dllm2rec.serve.recommend import load_student, open_checkpoint, recommend

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


# Modules the serving process must not need: the training stack, data pipeline, evaluation, FAISS,
# Accelerate/DeepSpeed, Arrow. The loader rebuilds the module from dllm2rec.models + safetensors.
_TRAINING_STACK = ("dllm2rec.train", "dllm2rec.losses", "dllm2rec.eval", "dllm2rec.data", "dllm2rec.studies",
                   "dllm2rec.bench", "accelerate", "deepspeed", "faiss", "pyarrow", "datasets", "pandas", "teacher")


def test_exported_folder_serves_recommend_and_plain_python(tmp_path):
    torch.set_num_threads(1)
    run = tiny_run.make_run(tmp_path, "gru4rec", ed=False, steps=8)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "items.jsonl", "manifest.json", "weights.safetensors"]
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"history": [1, 2, 3]}\n')
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["recommend", "--checkpoint", str(run), "--input", str(inp), "--output", str(a)]) == 0
    assert main(["recommend", "--checkpoint", str(out), "--input", str(inp), "--output", str(b)]) == 0
    assert a.read_text() == b.read_text()
    # No training stack is needed to serve the artefact: a fresh interpreter loads and scores it
    # importing only torch, safetensors and the model code.
    code = ("import sys, torch; from dllm2rec.serve.export import load_exported; "
            f"s = load_exported({str(out)!r}); print(s.topk([[1, 2, 3]], 20)[1][0].tolist()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dllm2rec', 'teacher', 'accelerate', "
            "'deepspeed', 'faiss', 'pyarrow', 'datasets', 'pandas')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ids_line, mods_line = res.stdout.strip().splitlines()[-2:]
    assert json.loads(ids_line) == json.loads(a.read_text())["items"]
    mods = json.loads(mods_line.replace("'", '"'))
    assert "dllm2rec.models.gru4rec" in mods and "dllm2rec.serve.export" in mods
    assert not [m for m in mods if m.startswith(_TRAINING_STACK)], mods


class _Payload:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _reseal(out: Path, name: str) -> None:
    """An attacker who controls the folder also rewrites the manifest's sha256 for ``name``."""
    from dllm2rec.serve.export import _sha256

    m = json.loads((out / "manifest.json").read_text())
    m["sha256"][name] = _sha256(out / name)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exp")
    run = tiny_run.make_run(root, "sasrec", ed=True, steps=2)
    assert main(["export", "--checkpoint", str(run), "--out", str(root / "exported")]) == 0
    return root / "exported"


def _copy(exported, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(exported, out)
    return out


@pytest.mark.parametrize("name", ["items.jsonl", "weights.safetensors", "config.yaml"])
def test_altered_artefact_is_refused(exported, tmp_path, name):
    out = _copy(exported, tmp_path)
    data = bytearray((out / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    (out / name).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"{name}: missing or sha256 differs from the manifest"):
        load_exported(out)


def test_incomplete_or_resealed_manifest_is_refused(exported, tmp_path):
    out = _copy(exported, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    del m["sha256"]["config.yaml"]  # a manifest that stops checking a file is not accepted
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"'sha256' must list exactly"):
        load_exported(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_exported(out)


def test_pickle_payload_is_never_executed(exported, tmp_path):
    import pickle

    out = _copy(exported, tmp_path)
    marker = tmp_path / "code-ran"
    for blob in (pickle.dumps(_Payload(marker)), None):
        if blob is None:  # the same payload inside a torch.save zip archive
            torch.save({"weight": _Payload(marker)}, out / "weights.safetensors")
        else:
            (out / "weights.safetensors").write_bytes(blob)
        _reseal(out, "weights.safetensors")  # sha256 matches: only the format protects the loader
        with pytest.raises(DataError, match=r"weights\.safetensors: truncated or corrupt safetensors file"):
            load_exported(out)
        assert not marker.exists()
    # an old torch.export artefact is refused before any of its files is opened
    old = _copy(exported, tmp_path / "old")
    torch.save({"x": _Payload(marker)}, old / "encoder.pt2")
    m = json.loads((old / "manifest.json").read_text())
    m.update(schema="dllm2rec.export/1", format="torch.export")
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"dllm2rec\.export/1 holds a torch\.export program.*Re-export"):
        load_exported(old)
    with pytest.raises(ManifestError, match=r"Re-export"):  # what `recommend --checkpoint OLD` calls
        open_checkpoint(old)
    assert not marker.exists()
