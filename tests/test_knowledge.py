"""Teacher knowledge loader: alignment by row_id and clear errors for every mismatch."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm2rec.data.dataset import load_dataset
from dllm2rec.errors import DataError, ManifestError
from dllm2rec.data.knowledge import KnowledgeError, load_teacher
from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset(synthetic_dataset(tmp_path_factory.mktemp("k") / "ds", n_items=30, n_train=64, n_valid=8, n_test=8))


@pytest.fixture
def teacher(ds, tmp_path):
    return synthetic_teacher(tmp_path / "t", ds, top_n=6, emb_dim=4, emb_dtype="float16")


def _rewrite(folder, fn):
    table = pq.read_table(folder / "rank_train.parquet")
    pq.write_table(fn(table), folder / "rank_train.parquet")


def test_aligned_by_row_id_not_position(ds, teacher):
    k = load_teacher(teacher, ds)
    table = pq.read_table(teacher / "rank_train.parquet")
    stored_ids = table.column("row_id").to_numpy()
    assert not np.array_equal(stored_ids, ds.splits["train"]["row_id"])  # file really is shuffled
    first = table.column("topk_ids").to_pylist()[0]
    pos = int(np.nonzero(ds.splits["train"]["row_id"] == stored_ids[0])[0][0])
    assert k.topk_ids[pos].tolist() == first
    # the synthetic teacher always lists the true target: alignment is right for every row
    assert all(t in row for t, row in zip(ds.splits["train"]["target"], k.topk_ids.tolist()))
    assert k.embeddings.dtype == torch.float16 and k.embeddings.shape == (30, 4)
    assert k.gt_dist is not None and k.top_n == 6 and k.source == "project"


def test_wrong_row_count(ds, teacher):
    _rewrite(teacher, lambda t: t.slice(0, 60))
    with pytest.raises(KnowledgeError, match="rank_train.parquet: has 60 rows but the dataset has 64 training rows"):
        load_teacher(teacher, ds)


def test_row_ids_of_another_split(ds, teacher):
    _rewrite(teacher, lambda t: t.set_column(0, "row_id", pa.array(t.column("row_id").to_numpy() + 1000)))
    with pytest.raises(KnowledgeError, match="has no teacher row"):
        load_teacher(teacher, ds)


def test_duplicate_row_id(ds, teacher):
    ids = pq.read_table(teacher / "rank_train.parquet").column("row_id").to_numpy().copy()
    ids[1] = ids[0]
    _rewrite(teacher, lambda t: t.set_column(0, "row_id", pa.array(ids)))
    with pytest.raises(KnowledgeError, match=f"row_id {ids[0]} appears more than once"):
        load_teacher(teacher, ds)


def test_ids_out_of_range(ds, teacher):
    def bad(t):
        rows = t.column("topk_ids").to_pylist()
        rows[3][2] = 30
        return t.set_column(t.column_names.index("topk_ids"), "topk_ids", pa.array(rows, pa.list_(pa.int32())))
    _rewrite(teacher, bad)
    with pytest.raises(KnowledgeError, match=r"row 3: item id 30 at position 2 is outside 0..29"):
        load_teacher(teacher, ds)


def test_nan_distance_and_embedding(ds, teacher):
    emb = load_file(str(teacher / "item_embeddings.safetensors"))["embeddings"].clone()
    emb[7, 1] = float("nan")
    save_file({"embeddings": emb}, str(teacher / "item_embeddings.safetensors"))
    with pytest.raises(KnowledgeError, match="item_embeddings.safetensors: row 7: embedding is NaN or infinite"):
        load_teacher(teacher, ds)

    def nan_dist(t):
        rows = t.column("topk_dist").to_pylist()
        rows[5][0] = float("nan")
        return t.set_column(t.column_names.index("topk_dist"), "topk_dist", pa.array(rows, pa.list_(pa.float32())))
    _rewrite(teacher, nan_dist)
    with pytest.raises(KnowledgeError, match="row 5: topk_dist is NaN or infinite"):
        load_teacher(teacher, ds)


def test_embedding_rows_must_equal_items(ds, teacher):
    save_file({"embeddings": torch.zeros(29, 4)}, str(teacher / "item_embeddings.safetensors"))
    with pytest.raises(KnowledgeError, match="embedding table has 29 rows but the dataset has 30 items"):
        load_teacher(teacher, ds)


def test_hash_mismatch(ds, teacher):
    m = json.loads((teacher / "manifest.json").read_text())
    m["id_map_hash"] = "0" * 64
    (teacher / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="id_map_hash .* differs from the dataset's"):
        load_teacher(teacher, ds)


def test_reference_tocf_folder(ds, teacher, tmp_path):
    from dllm2rec.data.reference import export_teacher_tocf

    project = load_teacher(teacher, ds)
    export_teacher_tocf(teacher, ds, tmp_path / "tocf")
    ref = load_teacher(tmp_path / "tocf", ds)
    assert ref.source == "reference" and ref.gt_dist is None
    assert np.array_equal(ref.topk_ids, project.topk_ids)
    assert np.allclose(ref.topk_dist, project.topk_dist)
    assert any("paper RD variant is unavailable" in n for n in ref.notes)
    (tmp_path / "tocf" / "myrank_train.txt").write_text("1 2 3 4 5 6\n")
    with pytest.raises(DataError, match="myrank_train.txt"):
        load_teacher(tmp_path / "tocf", ds)


def test_not_a_teacher_folder(ds, tmp_path):
    with pytest.raises(KnowledgeError, match="neither a teacher folder"):
        load_teacher(tmp_path, ds)


def test_partial_coverage_needs_min_coverage_and_masks_rows(tmp_path):
    """A teacher over a subset of training rows is refused by default; with min_coverage it loads,
    uncovered rows are flagged, and the batch carries a zero RD mask for them."""
    import pyarrow.parquet as pq

    from dllm2rec.train.batches import make_batch, split_tensors

    ds_dir = synthetic_dataset(tmp_path / "ds", n_items=30, n_train=64, n_valid=8, n_test=8)
    ds = load_dataset(ds_dir)
    t_dir = synthetic_teacher(tmp_path / "t", ds, top_n=8, emb_dim=6)
    rank = t_dir / "rank_train.parquet"
    table = pq.read_table(rank)
    keep = table.num_rows // 2
    pq.write_table(table.slice(0, keep), rank)
    with pytest.raises(KnowledgeError, match="training rows"):
        load_teacher(t_dir, ds)
    with pytest.raises(KnowledgeError, match="below distill.min_coverage"):
        load_teacher(t_dir, ds, min_coverage=0.9)
    tk = load_teacher(t_dir, ds, min_coverage=0.1)
    assert tk.covered is not None and int(tk.covered.sum()) == keep
    covered_ids = set(table.column("row_id").to_numpy()[:keep].tolist())
    train_ids = ds.splits["train"]["row_id"]
    assert [bool(c) for c in tk.covered] == [int(r) in covered_ids for r in train_ids]
    data = split_tensors(ds.splits["train"], ds.manifest["max_history"], ds.padding_id)
    b = make_batch(data, np.arange(len(train_ids)), teacher=tk, k=4)
    assert b.cand_mask.tolist() == [float(c) for c in tk.covered]
