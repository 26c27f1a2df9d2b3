"""``python -m teacher from-run --run RUN --out T [--top-n 50]``: a trained student as a teacher.

Any run folder of ``python -m dllm2rec train`` (any objective, width or student) becomes a
teacher folder (``teacher/folder.py``, score kind ``logit``):

- ``rank_<split>.parquet`` for every train/valid/test row: the run's top-n by ``recommend``
  (the serving path: eval mode, the most recent ``model.max_len`` items, no history exclusion),
  its scores as ``topk_scores`` (logits ``h . w_j + b_j``), ``topk_dist = s_1 - s_k``,
  ``gt_dist = s_1 - s_target`` and the exact ``target_rank`` (1 + #items scored strictly higher).
- ``item_embeddings.safetensors``: the run's input item table ``embed.item.weight`` rows 0..N-1
  (the output table ``[w_j]`` when the student has no ID embedding, e.g. ED without offset).

The RecBole comparison path produces the same kind of folder for a RecBole model:
``python -m dllm2rec recbole ... --teacher-out T`` (``dllm2rec/compare/recbole_teacher.py``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from teacher.folder import SPLITS, Rankings, write_teacher_folder


def item_table(student) -> np.ndarray:
    """Float32[N, H]: the student's input ID embedding (or its output rows when it has none)."""
    embed = getattr(student.model, "embed", None)
    item = getattr(embed, "item", None)
    table = item.weight[: student.n_items] if item is not None else student.output_weight
    return table.detach().float().numpy()


@torch.no_grad()
def split_rankings(student, cols: dict, top_n: int, batch_size: int = 2048) -> Rankings:
    """Top-n, scores, target score and exact target rank of every row of one split."""
    from dllm2rec.eval.metrics import rank_of_targets
    from dllm2rec.serve.recommend import pad_histories, recommend

    hists = [h[:n].tolist() for h, n in zip(cols["history"], cols["history_len"])]
    scores, ids = recommend(student, hists, top_n, retrieval="dense", batch_size=batch_size)
    target = torch.from_numpy(np.array(cols["target"], np.int64))
    w, b = student.output_weight, student.output_bias
    gt, ranks = [], []
    for s in range(0, len(hists), batch_size):
        hist, lengths = pad_histories(hists[s:s + batch_size], student.max_len, student.padding_id)
        h = student.encode(hist, lengths)
        t = target[s:s + batch_size]
        gt.append((h * w[t]).sum(1) + b[t])
        ranks.append(rank_of_targets(h, w, b, t))
    order = np.argsort(np.asarray(cols["row_id"]), kind="stable")
    return Rankings(np.asarray(cols["row_id"], np.int64)[order], ids.numpy()[order],
                    scores.float().numpy()[order], torch.cat(gt).numpy()[order],
                    torch.cat(ranks).numpy().astype(np.int64)[order])


def from_run(run: str | Path, out: str | Path, top_n: int = 50, dataset: str | Path | None = None,
             teacher: str | Path | None = None) -> dict:
    """Write the run ``run`` as the teacher folder ``out`` -> its manifest."""
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.errors import ConfigError
    from dllm2rec.serve.student import load_student

    student = load_student(run, dataset, teacher)
    if not 0 < top_n <= student.n_items:
        raise ConfigError(f"--top-n {top_n} must be in 1..{student.n_items}")
    ds = load_dataset(dataset or student.config.data.path)
    rankings = {s: split_rankings(student, ds.splits[s], top_n) for s in SPLITS if len(ds.splits[s]["row_id"])}
    cfg = student.config
    source = {"kind": "from-run", "run": str(run), "model": cfg.model.name, "hidden": cfg.model.hidden,
              "objective": cfg.loss.objective, "seed": cfg.train.seed, "embeddings_file": f"{run}/best/model.safetensors"}
    return write_teacher_folder(out, ds, rankings, "logit", item_table(student), source)
