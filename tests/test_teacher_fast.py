"""Teacher: prompts, config, sharding, FAISS grounding, merge/resume, tocf export (no LLM).

Generation and embedding shards are written here from synthetic vectors so that grounding,
merging and resuming are tested in isolation and fast; tests/test_teacher_llm.py runs the
same pipeline end to end with the real engines.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from dllm2rec.errors import ConfigError, DataError
from teacher import prompts
from teacher.config import load_teacher_config
from teacher.shards import ShardError, resolve_rank_world, shard_slice

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
          "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "Richard III (1995)",
          "Seven (Se7en) (1995)", "The Usual Suspects (1995)", "Mighty Aphrodite (1995)",
          "Postino, Il (1994)", "Mr. Holland's Opus (1995)"]


def tiny_dataset(out, n_rows=(10, 3, 3), L=10, seed=0):
    """A real dataset folder (dllm2rec.dataset/1) with random histories over TITLES."""
    from dllm2rec.data.dataset import DOMAINS, save_dataset

    rng = np.random.default_rng(seed)
    n, splits, rid = len(TITLES), {}, 0
    for name, rows in zip(("train", "valid", "test"), n_rows):
        hist = np.full((rows, L), n, np.int64)
        lens = rng.integers(1, L + 1, rows)
        for i, k in enumerate(lens):
            hist[i, :k] = rng.integers(0, n, k)
        splits[name] = {"row_id": np.arange(rid, rid + rows), "user": np.array([f"u{j}" for j in range(rid, rid + rows)], object),
                        "history": hist, "history_len": lens.astype(np.int64),
                        "target": rng.integers(0, n, rows).astype(np.int64), "timestamp": np.arange(rid, rid + rows)}
        rid += rows
    save_dataset(out, name="tiny", titles=TITLES, splits=splits, max_history=L, protocol={},
                 domain=DOMAINS["movies"], sources=[])
    return out


def teacher_cfg(ds, out, *extra):
    return load_teacher_config(None, [f"dataset={ds}", f"output_dir={out}", "ground.top_n=5", "embed.threads=1", *extra])


def fake_llm_shards(cfg, rank, world, dim=8, seed=1):
    """Write generate + embed shards from deterministic synthetic vectors (no LLM)."""
    from teacher.artifacts import load_teacher_data, work_dir, write_parquet, write_tensors
    from teacher.embed import embed_fingerprint
    from teacher.generate import generate_fingerprint
    from teacher.shards import mark_done, part

    data = load_teacher_data(cfg.dataset, cfg.limit)
    work = work_dir(cfg)
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(data.n_items, dim)).astype(np.float32) * 3
    sl = shard_slice(data.n_items, rank, world)
    p = part(work, "embed", "items", rank, world)
    write_tensors({"ids": np.arange(data.n_items)[sl], "embeddings": items[sl]}, p.path("safetensors"))
    mark_done(p, embed_fingerprint(cfg, data))
    for split in cfg.splits:
        rows = data.splits[split]
        sl = shard_slice(len(rows["row_id"]), rank, world)
        ids = rows["row_id"][sl]
        g = part(work, "generate", split, rank, world)
        write_parquet(pa.table({"row_id": ids, "raw": [f'"t{i}"' for i in ids], "generated": [f"t{i}" for i in ids]}), g.path("parquet"))
        mark_done(g, generate_fingerprint(cfg, data))
        # a query vector per row: deterministic in the row id, so sharding cannot change it
        q = np.stack([np.random.default_rng(int(i)).normal(size=dim) for i in ids]).astype(np.float32) if len(ids) else np.zeros((0, dim), np.float32)
        e = part(work, "embed", split, rank, world)
        write_tensors({"row_id": ids, "embeddings": q}, e.path("safetensors"))
        mark_done(e, embed_fingerprint(cfg, data))


def test_prompt_round_trip_and_training_text():
    d = prompts.Domain.from_manifest({"domain": {"item": "movie", "items": "movies", "verb": "watched"}})
    p = prompts.build_prompt(["Babe (1995)", 'Say "Hi"'], d)
    assert p.endswith("### Response:\n") and "### Instruction:\n" in p and "### Input:\n" in p
    assert 'The user has watched the following movies before: "Babe (1995)", "Say "Hi""' in p
    assert "recommend a new movie that the user likes" in p
    t = prompts.build_training_text(["Babe (1995)"], "Copycat (1995)", d, eos="<|im_end|>")
    assert t == prompts.build_prompt(["Babe (1995)"], d) + '"Copycat (1995)"<|im_end|>'
    assert prompts.extract_answer(t, eos="<|im_end|>") == "Copycat (1995)"
    assert prompts.extract_answer(' "Copycat (1995)"\nmore rambling') == "Copycat (1995)"
    assert prompts.extract_answer("   \n") == ""
    with pytest.raises(DataError, match="domain"):
        prompts.Domain.from_manifest({"domain": {"item": "movie"}})


def test_config_unknown_key_and_bad_choice(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("generate:\n  decodng: beam\n")
    with pytest.raises(ConfigError, match=r"generate\.decodng"):
        load_teacher_config(bad)
    with pytest.raises(ConfigError, match="generate.engine"):
        load_teacher_config(None, ["generate.engine=tensorrt"])
    cfg = load_teacher_config("launch/configs/teacher_ml100k.yaml", ["generate.decoding=beam"])
    assert cfg.generate.decoding == "beam" and cfg.model.base == "smollm2"
    assert load_teacher_config("launch/configs/teacher_gpu.yaml").embed.store_dtype == "float16"


def test_shard_slices_cover_rows_once_and_env(monkeypatch):
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            got = np.concatenate([np.arange(n)[shard_slice(n, r, world)] for r in range(world)])
            assert np.array_equal(got, np.arange(n))
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank_world() == (1, 4)
    monkeypatch.setenv("SLURM_PROCID", "2"), monkeypatch.setenv("SLURM_NTASKS", "3")
    assert resolve_rank_world() == (2, 3)
    assert resolve_rank_world(0, 2) == (0, 2)
    with pytest.raises(ShardError, match="rank 5 of world 2"):
        resolve_rank_world(5, 2)


def test_faiss_topn_equals_bruteforce_and_is_unsquared():
    from teacher.ground import exact_topk_torch, recall, search, target_ranks

    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 32)).astype(np.float32)
    q = rng.normal(size=(70, 32)).astype(np.float32)
    ids, dist = search(q, items, 20, batch_size=16)
    ref_ids, ref_dist = exact_topk_torch(q, items, 20)
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
    direct = np.linalg.norm(q[:, None, :] - items[ids], axis=2)  # un-squared, by definition
    np.testing.assert_allclose(dist, direct, rtol=1e-4)
    assert np.all(np.diff(dist, axis=1) >= 0) and dist.max() > 2.0  # squared values would differ a lot
    # rank of the nearest item is 1; of the 20th is 20
    assert np.array_equal(target_ranks(q, items, ids[:, 0]), np.ones(70))
    assert np.array_equal(target_ranks(q, items, ids[:, 19]), np.full(70, 20))
    hnsw, _ = search(q, items, 20, "hnsw", ef_search=256)
    assert recall(hnsw, ref_ids) > 0.9
    # IVF: probing every list is exact; probing a few lists is approximate but close
    ivf_all, ivf_all_dist = search(q, items, 20, "ivf", nlist=8, nprobe=8)
    assert np.array_equal(ivf_all, ref_ids)
    np.testing.assert_allclose(ivf_all_dist, ref_dist, rtol=1e-4, atol=1e-4)
    ivf_few, _ = search(q, items, 20, "ivf", nlist=8, nprobe=4)
    assert 0.5 < recall(ivf_few, ref_ids) < 1.0 + 1e-9
    with pytest.raises(ConfigError, match="top_n"):
        search(q, items[:5], 20)


def test_sharded_merge_equals_unsharded_and_resumes(tmp_path):
    from dllm2rec.data.knowledge import load_teacher
    from dllm2rec.data.dataset import load_dataset
    from teacher.artifacts import export_tocf, merge, read_rank_table
    from teacher.ground import ground_phase

    ds = tiny_dataset(tmp_path / "ds")
    one, two = teacher_cfg(ds, tmp_path / "one"), teacher_cfg(ds, tmp_path / "two")
    fake_llm_shards(one, 0, 1)
    ground_phase(one, 0, 1, progress=False)
    merge(one)
    for r in range(2):
        fake_llm_shards(two, r, 2)
    # shard 0 finishes, then the "job dies"; merge must refuse the incomplete set
    ground_phase(two, 0, 2, progress=False)
    with pytest.raises(ShardError, match=r"shards \[1\] of world 2"):
        merge(two)
    marker0 = tmp_path / "two/work/ground/train/part-00000-of-00002.done"
    before = marker0.stat().st_mtime_ns
    stats = ground_phase(two, 0, 2, progress=False)  # rerun of a finished shard does nothing
    assert stats["done"] == [] and stats["skipped"] == ["train", "valid", "test"]
    stats = ground_phase(two, 1, 2, progress=False)
    assert [d["split"] for d in stats["done"]] == ["train", "valid", "test"]
    assert marker0.stat().st_mtime_ns == before
    m = merge(two)
    for split in ("train", "valid", "test"):
        a, b = read_rank_table(tmp_path / "one", split), read_rank_table(tmp_path / "two", split)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert m["splits"] == {"train": 10, "valid": 3, "test": 3} and m["normalized"] is False and m["top_n"] == 5
    import pyarrow.parquet as pq

    for split in ("train", "valid", "test"):  # diversity of the answers, recounted from the rank file
        gen = pq.read_table(tmp_path / "two" / f"rank_{split}.parquet").column("generated").to_pylist()
        top1 = read_rank_table(tmp_path / "two", split)["topk_ids"][:, 0]
        assert m["diversity"][split] == {"rows": m["splits"][split], "distinct_generated": len(set(gen)),
                                         "distinct_top1": len(set(top1.tolist()))}
    know = load_teacher(tmp_path / "two", load_dataset(ds))  # the students' loader accepts it
    assert know.topk_ids.shape == (10, 5)
    tocf = export_tocf(tmp_path / "two", tmp_path / "tocf")
    lines = (tocf / "myrank_train.txt").read_text().splitlines()
    assert len(lines) == 10
    first = read_rank_table(tmp_path / "two", "train")
    assert [int(x) for x in lines[0].split()] == first["topk_ids"][0].tolist()
    conf = np.loadtxt(tocf / "confidence_train.txt")
    np.testing.assert_allclose(conf, first["topk_dist"], rtol=1e-6)
    from dllm2rec.data.reference import read_tocf

    ids, dist, emb = read_tocf(tocf, 10, n_items=len(TITLES), expected_id_map_hash=m["id_map_hash"])
    assert np.array_equal(ids, first["topk_ids"]) and emb.shape == (len(TITLES), 8)


def test_bad_teacher_inputs_give_clear_errors(tmp_path):
    from teacher.artifacts import merge, read_tensors
    from teacher.ground import ground_phase
    from teacher.model import ModelError, resolve_adapter, resolve_base_model

    ds = tiny_dataset(tmp_path / "ds", n_rows=(4, 2, 2))
    cfg = teacher_cfg(ds, tmp_path / "t")
    with pytest.raises(ShardError, match="no finished shards"):
        ground_phase(cfg, 0, 1, progress=False)
    fake_llm_shards(cfg, 0, 1)
    ground_phase(cfg, 0, 1, progress=False)
    # a stray shard from another world size must be refused, not silently merged
    fake_llm_shards(teacher_cfg(ds, tmp_path / "t"), 1, 2)
    with pytest.raises(ShardError, match="different world sizes"):
        merge(cfg)
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="bad.safetensors"):
        read_tensors(corrupt)
    with pytest.raises(ModelError, match="not found"):
        resolve_base_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_base_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="adapter_config.json"):
        resolve_adapter(str(tmp_path / "empty"))
    bad_ds = tmp_path / "ds_nodomain"
    tiny_dataset(bad_ds, n_rows=(2, 1, 1))
    man = json.loads((bad_ds / "manifest.json").read_text())
    del man["domain"]
    (bad_ds / "manifest.json").write_text(json.dumps(man))
    from teacher.artifacts import load_teacher_data

    with pytest.raises(DataError, match="domain"):
        load_teacher_data(bad_ds)


def test_cli_help_is_cheap():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import teacher.cli, sys; teacher.cli.build_parser();"
                          "print(sorted(m for m in ('torch','vllm','transformers','faiss') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_embed_unique_embeds_each_distinct_text_once_in_row_order():
    import numpy as np

    from teacher.embed import embed_unique

    calls = []

    def run(texts):
        calls.append(list(texts))
        return np.array([[len(t), ord(t[0]) if t else 0] for t in texts], np.float32)

    texts = ["Heat (1995)", "Fargo (1996)", "Heat (1995)", "", "Fargo (1996)", "Heat (1995)"]
    out = embed_unique(run, texts)
    assert calls == [["Heat (1995)", "Fargo (1996)", ""]]  # one call, distinct texts, first-seen order
    np.testing.assert_array_equal(out, run(texts))  # the same rows as embedding every text
    assert embed_unique(lambda t: np.zeros((len(t), 2), np.float32), []).shape == (0, 2)


def test_model_convert_and_digest_errors_are_clear(tmp_path, capsys):
    from teacher.cli import run

    empty = tmp_path / "cache"
    assert run(["model", "convert", "--cache", str(empty)]) == 2
    assert "--gguf FILE is required" in capsys.readouterr().err
    assert run(["model", "convert", "--cache", str(empty), "--gguf", str(tmp_path / "no.gguf")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert not (empty / "models").exists()  # nothing half-made
    assert run(["model", "digest", "--path", str(tmp_path)]) == 2  # not a model folder
    assert "config.json" in capsys.readouterr().err


def test_model_digest_depends_on_values_not_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from teacher.model import model_digest

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    x, y = torch.arange(6.0).reshape(2, 3), torch.ones(4)
    save_file({"x": x, "y": y}, str(a / "model.safetensors"))
    save_file({"y": y}, str(b / "part-1.safetensors"))  # same tensors, split over two files
    save_file({"x": x}, str(b / "part-2.safetensors"))
    save_file({"x": x, "y": y * 2}, str(c / "model.safetensors"))
    assert model_digest(a) == model_digest(b) != model_digest(c)
