"""Tiny synthetic dataset + teacher folder + trained student run, for recommend/export tests.

Users walk the catalogue in steps (item i is followed by i+step mod N), so a few epochs teach a
student a non-trivial ranking. The teacher folder is a real ``dllm2rec.teacher/1`` folder with
random item embeddings (ED needs only the table; RD is off).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

N_ITEMS = 48
MAX_LEN = 5
LLM_DIM = 24


def titles() -> list[str]:
    t = [f"Item {i} (200{i % 10})" for i in range(N_ITEMS)]
    t[3] = " Spaced Title "  # stray spaces like the reference Games titles
    t[7] = t[8] = "Twin Title"  # an ambiguous title
    return t


def _rows(rng, n_users: int, step_of_user):
    hist, lens, tgt = [], [], []
    for u in range(n_users):
        step = step_of_user(u)
        start = int(rng.integers(N_ITEMS))
        n = int(rng.integers(2, MAX_LEN + 2))
        seq = [(start + step * j) % N_ITEMS for j in range(n)]
        h = seq[:-1][-MAX_LEN:]
        hist.append(h + [N_ITEMS] * (MAX_LEN - len(h)))
        lens.append(len(h))
        tgt.append(seq[-1])
    return np.array(hist, np.int64), np.array(lens, np.int64), np.array(tgt, np.int64)


def make_dataset(root: Path) -> Path:
    from dllm2rec.data.dataset import save_dataset

    rng = np.random.default_rng(0)
    counts = {"train": 600, "valid": 80, "test": 80}
    splits, row = {}, 0
    for name, r in counts.items():
        h, l, t = _rows(rng, r, lambda u: 1 + u % 3)
        splits[name] = {"row_id": np.arange(row, row + r, dtype=np.int64), "user": np.array([f"u{row + i}" for i in range(r)]),
                        "history": h, "history_len": l, "target": t,
                        "timestamp": np.arange(row, row + r, dtype=np.int64)}
        row += r
    out = root / "data"
    save_dataset(out, name="tiny", titles=titles(), splits=splits, max_history=MAX_LEN, protocol={"kind": "synthetic"},
                 domain={"item": "item", "items": "items", "verb": "used"}, sources=[])
    return out


def make_teacher(root: Path, dataset_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from dllm2rec.atomic import write_manifest
    from dllm2rec.data.dataset import load_dataset

    ds = load_dataset(dataset_path)
    train = ds.splits["train"]
    r = len(train["target"])
    rng = np.random.default_rng(1)
    out = root / "teacher"
    out.mkdir(parents=True)
    top = np.stack([rng.permutation(N_ITEMS)[:10] for _ in range(r)]).astype(np.int32)
    dist = np.sort(rng.random((r, 10)).astype(np.float32), axis=1)
    pq.write_table(pa.table({"row_id": train["row_id"], "generated": ["x"] * r,
                             "topk_ids": pa.array(top.tolist(), pa.list_(pa.int32())),
                             "topk_dist": pa.array(dist.tolist(), pa.list_(pa.float32())),
                             "gt_dist": rng.random(r).astype(np.float32)}), out / "rank_train.parquet")
    emb = torch.from_numpy(rng.standard_normal((N_ITEMS, LLM_DIM)).astype(np.float32))
    save_file({"embeddings": emb}, str(out / "item_embeddings.safetensors"))
    write_manifest(out, {"schema": "dllm2rec.teacher/1", "n_items": N_ITEMS, "id_map_hash": ds.id_map_hash,
                         "emb_dim": LLM_DIM, "top_n": 10, "splits": {"train": r}})
    return out


def make_run(root: Path, model: str = "sasrec", ed: bool = True, steps: int = 60) -> Path:
    """Train a tiny student and write a run folder like the trainer's (config.yaml,
    best/model.safetensors, results.json).

    The loop is a plain full-softmax one (not dllm2rec.train.loop): these tests are about using a
    trained student, and must not depend on the distributed trainer.
    """
    from safetensors.torch import save_file

    from dllm2rec.atomic import atomic_write_json
    from dllm2rec.train.batches import split_tensors
    from dllm2rec.config import dump_config, load_config
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.models import build_student

    data = make_dataset(root)
    run = root / "run"
    overrides = [f"data.path={data}", f"model.name={model}", "model.hidden=16", f"model.max_len={MAX_LEN}",
                 "model.caser_heights=[2,3]", "model.caser_filters=4", f"train.output_dir={run}",
                 "eval.ks=[1,5,10,20]", "loss.objective=ce"]
    llm_table = None
    if ed:
        from dllm2rec.data.knowledge import load_teacher

        teacher = make_teacher(root, data)
        overrides += [f"distill.teacher={teacher}", "distill.ed.enabled=true", "distill.ed.weight=0.5"]
    cfg = load_config(None, overrides)
    ds = load_dataset(data)
    if ed:
        llm_table = load_teacher(teacher, ds).embeddings
    torch.manual_seed(0)
    student = build_student(cfg.model, ds.n_items, LLM_DIM if ed else None, cfg.distill.ed.weight,
                            cfg.distill.ed.learnable_offset)
    tr = split_tensors(ds.splits["train"], MAX_LEN, ds.padding_id, "train")
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    kw = {"llm_table": llm_table} if ed else {}
    student.train()
    for step in range(steps):
        idx = torch.randint(0, len(tr), (64,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(student(tr.history[idx], tr.lengths[idx], **kw), tr.target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    (run / "best").mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()}, str(run / "best" / "model.safetensors"))
    dump_config(cfg, run / "config.yaml")
    atomic_write_json(run / "results.json", {"best_epoch": 1, "valid": {"ndcg@20": 0.0}, "test": {"ndcg@20": 0.0},
                                             "protocol": "synthetic test run", "final_loss": float(loss.detach())})
    return run
