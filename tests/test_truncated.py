"""A truncated artefact of every type gives the project's named error (file + problem), never a
library traceback; a teacher list out of ranking order is refused.

Each case copies a valid folder, cuts one file to its first ``cut`` bytes (16 bytes: inside the
header/magic; half: inside the data) and calls the stage's own reader.
"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dllm2rec.errors import ConfigError, DataError, ManifestError

try:
    import tiny_run
except ImportError:  # pragma: no cover - collected as a package
    from tests import tiny_run


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from dllm2rec.data.reference import export_teacher_tocf
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.serve.export import export_student
    from dllm2rec.serve.student import load_student
    from dllm2rec.train import checkpoint as ckpt

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trunc")
    run = tiny_run.make_run(root, "gru4rec", ed=True, steps=2)
    ds_path, teacher = root / "data", root / "teacher"
    ds = load_dataset(ds_path)
    export_teacher_tocf(teacher, ds, root / "tocf")
    export_student(load_student(run), root / "export")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(root / "ckpt", model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                         rng_states=[ckpt.rng_state()], state={"epoch": 1, "step": 0}, config_text="a: 1\n",
                         inputs={"dataset_sha256": "x"})
    (root / "study.yaml").write_text("dataset: d\nteacher: t\nout: o\nstudents: [sasrec]\nvariants: [none]\n")
    return SimpleNamespace(root=root, run=run, ds_path=ds_path, ds=ds, teacher=teacher)


def _dataset(fx, d):
    from dllm2rec.data.dataset import load_dataset

    return lambda: load_dataset(d)


def _teacher(fx, d):
    from dllm2rec.data.knowledge import load_teacher

    return lambda: load_teacher(d, fx.ds)


def _ckpt(fx, d):
    from dllm2rec.train.checkpoint import load_checkpoint

    return lambda: load_checkpoint(d)


def _student(fx, d):
    from dllm2rec.serve.student import load_student

    return lambda: load_student(d)


def _export(fx, d):
    from dllm2rec.serve.export import load_exported

    return lambda: load_exported(d)


def _study_table(fx, d):
    from dllm2rec.studies.experiment import Cell
    from dllm2rec.studies.study_table import collect

    return lambda: collect([Cell("gru4rec", "none", 0, d, [])], 20)


def _teacher_rank(fx, d):
    from teacher.artifacts import read_rank_table

    return lambda: read_rank_table(d, "train")


def _yaml(fx, d):
    from dllm2rec.studies.experiment import load_study

    return lambda: load_study(d / "study.yaml")


# (id, folder under the fixture root, file inside it (glob), reader, error type)
CASES = [
    ("dataset-arrow-split", "data", "splits/train/*.arrow", _dataset, DataError),
    ("dataset-items-parquet", "data", "items.parquet", _dataset, DataError),
    ("dataset-manifest-json", "data", "manifest.json", _dataset, ManifestError),
    ("dataset-split-state-json", "data", "splits/valid/state.json", _dataset, ManifestError),
    ("teacher-rank-parquet", "teacher", "rank_train.parquet", _teacher, DataError),
    ("teacher-embeddings-safetensors", "teacher", "item_embeddings.safetensors", _teacher, DataError),
    ("teacher-manifest-json", "teacher", "manifest.json", _teacher, ManifestError),
    ("teacher-rank-parquet-teacher-side", "teacher", "rank_train.parquet", _teacher_rank, DataError),
    ("tocf-embeddings-pt", "tocf", "all_embeddings.pt", _teacher, DataError),
    ("tocf-rank-text", "tocf", "myrank_train.txt", _teacher, DataError),
    ("checkpoint-model-safetensors", "ckpt", "model.safetensors", _ckpt, DataError),
    ("checkpoint-optimizer-safetensors", "ckpt", "optimizer.safetensors", _ckpt, DataError),
    ("checkpoint-optimizer-json", "ckpt", "optimizer.json", _ckpt, DataError),
    ("checkpoint-rng-safetensors", "ckpt", "rng.safetensors", _ckpt, DataError),
    ("checkpoint-state-json", "ckpt", "state.json", _ckpt, DataError),
    ("checkpoint-manifest-json", "ckpt", "manifest.json", _ckpt, ManifestError),
    ("run-best-weights-safetensors", "run", "best/model.safetensors", _student, DataError),
    ("run-results-json-study-table", "run", "results.json", _study_table, DataError),
    ("export-weights-safetensors", "export", "weights.safetensors", _export, ManifestError),  # sha256 first
    ("export-manifest-json", "export", "manifest.json", _export, DataError),
]


@pytest.mark.parametrize("cut", ["16-bytes", "half"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_truncated_file_gives_a_named_error(fx, tmp_path, case, cut):
    _, folder, pattern, reader, error = case
    d = tmp_path / folder
    shutil.copytree(fx.root / folder, d)
    (f,) = sorted(d.glob(pattern))
    data = f.read_bytes()
    f.write_bytes(data[:16] if cut == "16-bytes" else data[: len(data) // 2])
    with pytest.raises(error) as info:
        reader(fx, d)()
    msg = str(info.value)
    assert f.name in msg or str(d) in msg, msg  # names the file (or, for the split table, its folder)
    assert type(info.value).__module__.startswith("dllm2rec")


def test_truncated_export_weights_with_a_resealed_manifest_are_a_data_error(fx, tmp_path):
    from dllm2rec.serve.export import _sha256, load_exported

    d = tmp_path / "export"
    shutil.copytree(fx.root / "export", d)
    f = d / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    m = json.loads((d / "manifest.json").read_text())
    m["sha256"]["weights.safetensors"] = _sha256(f)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"weights\.safetensors: truncated or corrupt safetensors file"):
        load_exported(d)


def test_yaml_cut_inside_a_key_or_a_character_is_a_config_error(fx, tmp_path):
    from dllm2rec.config import load_config

    d = tmp_path / "y"
    d.mkdir()
    text = (fx.root / "study.yaml").read_text()
    (d / "study.yaml").write_text(text[: text.index("students") + 4])  # "stud" without its ':'
    with pytest.raises(ConfigError, match=r"study\.yaml: not valid YAML"):
        _yaml(fx, d)()
    cfg = d / "run.yaml"
    cfg.write_bytes("model: {name: sasrec}  # caf\u00e9".encode()[:-1])  # cut inside the two-byte é
    with pytest.raises(ConfigError, match=r"run\.yaml: truncated or corrupt: not UTF-8"):
        load_config(cfg)


def test_unordered_teacher_list_is_refused(fx, tmp_path):
    """A teacher folder whose distance list is reversed used to train silently (issue #17)."""
    from dllm2rec.data.knowledge import KnowledgeError

    d = tmp_path / "teacher"
    shutil.copytree(fx.teacher, d)
    t = pq.read_table(d / "rank_train.parquet")
    rows = t.column("topk_dist").to_pylist()
    rows[5] = rows[5][::-1]
    ids = t.column("topk_ids").to_pylist()
    ids[5] = ids[5][::-1]
    t = t.set_column(t.column_names.index("topk_dist"), "topk_dist", pa.array(rows, pa.list_(pa.float32())))
    t = t.set_column(t.column_names.index("topk_ids"), "topk_ids", pa.array(ids, pa.list_(pa.int32())))
    pq.write_table(t, d / "rank_train.parquet")
    with pytest.raises(KnowledgeError, match=r"rank_train\.parquet: row 5: topk_dist is not ascending"):
        _teacher(fx, d)()
    # ties are in order (equal distances keep their order)
    rows[5] = [1.0] * len(rows[5])
    t = t.set_column(t.column_names.index("topk_dist"), "topk_dist", pa.array(rows, pa.list_(pa.float32())))
    pq.write_table(t, d / "rank_train.parquet")
    assert _teacher(fx, d)().top_n == len(rows[5])


def test_every_artefact_type_has_a_case():
    kinds = {c[2].rsplit(".", 1)[-1] for c in CASES}  # YAML: test_yaml_cut_inside_a_key_or_a_character...
    assert {"arrow", "parquet", "json", "safetensors", "pt", "txt"} <= kinds
