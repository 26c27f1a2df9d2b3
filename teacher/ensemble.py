"""``python -m teacher from-run --run A --run B ...``: an ensemble of trained runs as one teacher.

The ensemble's probability of item j for a row is the mean of the members' full-catalogue
softmax probabilities, ``p_j = (1/M) sum_m softmax(h_m . W_m + b_m)_j``; the teacher folder
stores ``log p_j`` with score kind ``logprob``, so the RD confidence weight over the top K is
``p_k / sum_{j<=K} p_j`` (README "Score kinds"), exactly as for a single teacher's softmax.
Averaging probabilities rather than logits keeps members of different scale (a CE and a BCE run,
different widths) on one footing. ``target_rank`` is exact over all N items (1 + #items with a
strictly higher ensemble probability) and ``gt_score`` is the target's ``log p``.

Item embeddings: the members' item tables side by side, [N, sum_m H_m] (ED projects any width).
Every member must be a run on the same dataset (the same ``id_map_hash``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from teacher.folder import SPLITS, Rankings, write_teacher_folder
from teacher.from_run import item_table


@torch.no_grad()
def ensemble_logprobs(students: list, hist: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Float32[B, N]: log of the members' mean softmax over the catalogue for one padded batch.

    hist int64 [B, L] padded with each member's padding id (all members share it: same dataset);
    lengths int64 [B].
    """
    per_member = []
    for s in students:
        h = s.encode(hist, lengths)
        logits = h @ s.output_weight.T + s.output_bias
        per_member.append(torch.log_softmax(logits.float(), dim=1))
    stacked = torch.stack(per_member)  # [M, B, N]
    return torch.logsumexp(stacked, dim=0) - float(np.log(len(students)))


@torch.no_grad()
def split_rankings(students: list, cols: dict, top_n: int, batch_size: int = 1024) -> Rankings:
    """Top-n by ensemble probability, log-probabilities, target log-prob and exact target rank."""
    from dllm2rec.serve.recommend import pad_histories

    max_len, pad = students[0].max_len, students[0].padding_id
    hists = [h[:n].tolist() for h, n in zip(cols["history"], cols["history_len"])]
    target = torch.from_numpy(np.array(cols["target"], np.int64))  # a writable copy
    ids, scores, gt, ranks = [], [], [], []
    for s in range(0, len(hists), batch_size):
        hist, lengths = pad_histories(hists[s:s + batch_size], max_len, pad)
        lp = ensemble_logprobs(students, hist, lengths)
        t = target[s:s + batch_size]
        top = torch.topk(lp, top_n, dim=1)
        ids.append(top.indices)
        scores.append(top.values)
        g = lp.gather(1, t.view(-1, 1))
        gt.append(g.squeeze(1))
        ranks.append((lp > g).sum(1) + 1)
    order = np.argsort(np.asarray(cols["row_id"]), kind="stable")
    return Rankings(np.asarray(cols["row_id"], np.int64)[order], torch.cat(ids).numpy()[order],
                    torch.cat(scores).numpy()[order], torch.cat(gt).numpy()[order],
                    torch.cat(ranks).numpy().astype(np.int64)[order])


def _trained_on(run: str | Path, student) -> str:
    """The id_map_hash of the dataset ``run`` was trained on: its run manifest, else its titles."""
    from dllm2rec.data.dataset import id_map_hash
    from dllm2rec.readers import read_json

    man = Path(run) / "manifest.json"
    if man.is_file():
        recorded = read_json(man).get("dataset_id_map_hash")
        if recorded:
            return str(recorded)
    return id_map_hash(list(student.titles))


def ensemble_from_runs(runs: list[str | Path], out: str | Path, top_n: int = 50,
                       dataset: str | Path | None = None) -> dict:
    """Write the ensemble of ``runs`` (>= 2 run folders) as the teacher folder ``out`` -> manifest."""
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.errors import ConfigError
    from dllm2rec.serve.student import load_student

    if len(runs) < 2:
        raise ConfigError("an ensemble needs at least two --run folders")
    students = [load_student(r, dataset) for r in runs]
    ds = load_dataset(dataset or students[0].config.data.path)
    for r, s in zip(runs, students):
        if _trained_on(r, s) != ds.id_map_hash:
            raise ConfigError(f"--run {r}: trained on another catalogue (id_map_hash {_trained_on(r, s)[:12]}... "
                              f"!= the dataset's {ds.id_map_hash[:12]}...): ensemble members must share one dataset")
        if s.max_len != students[0].max_len:
            raise ConfigError(f"--run {r}: history length {s.max_len}, --run {runs[0]}: "
                              f"{students[0].max_len}; ensemble members must share model.max_len")
        s.model.eval()
    if not 0 < top_n <= ds.n_items:
        raise ConfigError(f"--top-n {top_n} must be in 1..{ds.n_items}")
    rankings = {sp: split_rankings(students, ds.splits[sp], top_n) for sp in SPLITS if len(ds.splits[sp]["row_id"])}
    table = np.concatenate([item_table(s) for s in students], axis=1)
    source = {"kind": "from-run-ensemble", "runs": [str(r) for r in runs],
              "members": [{"model": s.config.model.name, "hidden": s.config.model.hidden,
                           "objective": s.config.loss.objective, "seed": s.config.train.seed} for s in students],
              "combine": "mean of softmax probabilities", "embeddings_file": "concatenated member item tables"}
    return write_teacher_folder(out, ds, rankings, "logprob", table, source)
