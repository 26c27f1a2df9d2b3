"""Train and test ONE RecBole 1.2.1 model on an exported split; run with the RecBole venv's python.

This file is executed as a script by ``dllm2rec/compare/recbole.py`` with the OPTIONAL RecBole
venv (``launch/recbole_env.sh``: numpy < 2, recbole==1.2.1). It imports only the standard
library, numpy, torch and recbole -- never the ``dllm2rec`` package, whose dependencies live in
the main venv.

    python recbole_runner.py --data-path D --dataset NAME --model SASRec --seed 0 \
        --config base.yaml --config sasrec.yaml --out RUN_DIR [--epochs 50] [--threads 1] \
        [--teacher-top-n 50]

Writes (temp + rename) into RUN_DIR:
- ``runner.json``: RecBole's best valid result, its test result at the best-valid epoch (the
  best-valid weights are restored before testing), best epoch, epochs run, per-epoch valid
  score, item/row counts, timings, versions;
- ``test_ranks.npy`` int64 [R_test, 2]: (row_id, 1-based rank of the target among all N items
  under RecBole's scores) so the caller can recompute HR/NDCG with OUR definitions;
- with ``--teacher-top-n N`` the best-valid model as a distillation teacher, in the
  ``python -m teacher import`` format (README "Distil from your own teacher"):
  ``teacher_rankings.jsonl``, one record per row of OUR train, valid and test splits
  (``row_id``; ``topk_ids`` our item ids 0..N-1 best first; ``topk_scores`` RecBole's full-sort
  logits, descending; ``gt_score`` the logit of the row's true item; ``target_rank`` its exact
  1-based rank among all N items), and ``item_embeddings.npy`` float32 [N, d], the model's
  ``item_embedding`` table (the same table its full-sort scores are dot products with) in OUR
  item order, RecBole's ``[PAD]`` row dropped. Each row is scored from its own history as
  exported (``item_id_list`` / ``item_length`` of that split's RecBole dataset; benchmark files
  are never augmented, so the train split holds exactly our training rows). JSON lines because
  the RecBole venv has no pyarrow; ``runner.json`` gets a ``teacher`` entry (rows, seconds).

No checkpoint file is written or read: RecBole's ``_save_checkpoint`` is replaced by an
in-memory copy of the best state_dict. RecBole 1.2.1 would otherwise ``torch.save`` a pickle
holding its Config and later ``torch.load`` it, which torch >= 2.6 refuses under
``weights_only=True``; keeping the weights in memory needs neither a pickle nor that override.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _rows_and_ranks(trainer, test_data, dataset):
    """(row_id, rank) per test row from RecBole's own full-sort scores (PAD column = -inf)."""
    import numpy as np
    import torch

    out = []
    trainer.model.eval()
    with torch.no_grad():
        for batched in test_data:
            interaction, scores, _pos_u, pos_i = trainer._full_sort_batch_eval(batched)
            target = scores.gather(1, pos_i.view(-1, 1))
            rank = (scores > target).sum(1) + 1  # strict: ties count in the target's favour
            sess = dataset.id2token(dataset.uid_field, interaction[dataset.uid_field].cpu().numpy())
            out.append(np.stack([np.asarray(sess, dtype=np.int64), rank.cpu().numpy().astype(np.int64)], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def item_maps(id2token, n_items: int):
    """RecBole's item tokens -> (ours_of_internal Int64[N+1], internal_of_ours Int64[N]).

    ``id2token`` is RecBole's ``field2id_token['item_id']``: str[N+1], entry 0 ``[PAD]``, entry i
    the token of internal id i. Our export writes item j as the token ``str(j)``, so the token IS
    our id. ``ours_of_internal[0] = -1`` (PAD has no item of ours). ValueError when the tokens
    after PAD are not exactly ``0..N-1`` once each (another export, or RecBole dropped an item).
    """
    import numpy as np

    tokens = [str(t) for t in id2token[1:]]
    if len(tokens) != n_items or not all(t.isdigit() for t in tokens):
        raise ValueError(f"RecBole's item tokens are not our ids 0..{n_items - 1} ({len(tokens)} tokens)")
    ours = np.array([int(t) for t in tokens], np.int64)
    if not np.array_equal(np.sort(ours), np.arange(n_items)):
        raise ValueError(f"RecBole's item tokens do not cover our ids 0..{n_items - 1} exactly once")
    internal_of_ours = np.empty(n_items, np.int64)
    internal_of_ours[ours] = np.arange(1, n_items + 1)
    return np.concatenate([[-1], ours]), internal_of_ours


def top_n_rows(scores, target, top_n: int, ours_of_internal):
    """One batch of full-sort scores -> the teacher-import fields (numpy), in our item ids.

    scores Float[B, N+1] (column = RecBole internal id; column 0 is [PAD] and is set to -inf
    here, in place, as RecBole's own evaluation does); target Int64[B] internal ids of the true
    items; returns topk_ids Int64[B, n] (ours, best first), topk_scores Float32[B, n]
    (descending), gt_score Float32[B], target_rank Int64[B] = 1 + #items scored strictly higher
    (the rank ``test_ranks.npy`` holds).
    """
    import torch

    scores[:, 0] = -torch.inf
    vals, idx = torch.topk(scores, top_n, dim=1)  # sorted=True: best first
    gt = scores.gather(1, target.view(-1, 1).to(scores.device))
    rank = (scores > gt).sum(1) + 1
    ids = torch.from_numpy(ours_of_internal)[idx.cpu()]
    return (ids.numpy(), vals.float().cpu().numpy(), gt.view(-1).float().cpu().numpy(),
            rank.cpu().numpy().astype("int64"))


def ranking_lines(row_id, ids, vals, gt, rank) -> list[str]:
    """JSON lines of the teacher-import format; floats as %.9g (round-trips float32 exactly)."""
    def floats(v):
        return "[" + ",".join("%.9g" % x for x in v) + "]"

    return [f'{{"row_id":{int(r)},"topk_ids":[{",".join(map(str, i))}],"topk_scores":{floats(v)},'
            f'"gt_score":{"%.9g" % g},"target_rank":{int(k)}}}\n'
            for r, i, v, g, k in zip(row_id, ids.tolist(), vals.tolist(), gt.tolist(), rank)]


def score_split(model, loader, dataset, top_n: int, ours_of_internal, batch_size: int, fh) -> int:
    """Write the rankings line of every row of one split loader's dataset to ``fh`` -> row count.

    Each row is scored from its own ``item_id_list`` / ``item_length`` with the model's
    ``full_sort_predict`` (as ``Trainer._full_sort_batch_eval`` does; no history masking:
    sequential full-sort evaluation masks nothing). The row id is the row's session token.
    """
    import numpy as np
    import torch

    split_ds, n = loader._dataset, 0
    with torch.no_grad():
        for s in range(0, len(split_ds), batch_size):
            inter = split_ds[np.arange(s, min(s + batch_size, len(split_ds)))]
            inter = loader.transform(split_ds, inter).to(model.device)
            scores = model.full_sort_predict(inter).view(len(inter), -1).float()
            fields = top_n_rows(scores, inter[dataset.iid_field], top_n, ours_of_internal)
            sess = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].cpu().numpy())
            lines = ranking_lines([int(t) for t in sess], *fields)
            fh.writelines(lines)
            n += len(lines)
    return n


def write_teacher(out: Path, model, loaders: dict, dataset, top_n: int, batch_size: int) -> dict:
    """Write teacher_rankings.jsonl + item_embeddings.npy (each atomically) -> runner.json entry."""
    import numpy as np

    t0 = time.time()
    n_items = dataset.item_num - 1
    ours_of_internal, internal_of_ours = item_maps(dataset.field2id_token[dataset.iid_field], n_items)
    if not hasattr(model, "item_embedding"):
        raise ValueError(f"{type(model).__name__} has no item_embedding table to export")
    table = model.item_embedding.weight.detach().float().cpu().numpy()[internal_of_ours]
    model.eval()
    rows: dict[str, int] = {}

    def save_rankings(tmp):  # streamed: one batch of lines at a time, never the whole file
        with open(tmp, "w", encoding="utf-8") as fh:
            for split, loader in loaders.items():
                rows[split] = score_split(model, loader, dataset, top_n, ours_of_internal, batch_size, fh)

    def save_table(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(table, np.float32), allow_pickle=False)

    _write_atomic(out / "teacher_rankings.jsonl", save_rankings)
    scored = time.time() - t0  # scoring and writing the lines
    _write_atomic(out / "item_embeddings.npy", save_table)
    total = time.time() - t0
    return {"top_n": top_n, "rows": rows, "score_seconds": round(scored, 2),
            "rows_per_second": round(sum(rows.values()) / max(scored, 1e-9), 1),
            "total_seconds": round(total, 2), "emb_dim": int(table.shape[1]),
            "files": ["teacher_rankings.jsonl", "item_embeddings.npy"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-items", type=int, required=True, help="N, to check RecBole ranks all items")
    p.add_argument("--teacher-top-n", type=int, default=None,
                   help="also write the model as a teacher (top-n per train/valid/test row)")
    args = p.parse_args(argv)

    # Run as a script, this file's folder is sys.path[0], and its sibling ``recbole.py`` (the
    # dllm2rec command) would shadow the ``recbole`` package; drop that folder first.
    here = Path(__file__).resolve().parent
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != here]
    import numpy as np
    import torch
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    if args.teacher_top_n is not None and not 1 <= args.teacher_top_n <= args.n_items:
        print(f"error: --teacher-top-n {args.teacher_top_n} outside 1..{args.n_items}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"data_path": str(Path(args.data_path).resolve()), "seed": args.seed,
                 "checkpoint_dir": str(out / "saved"), "log_wandb": False}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    sys.argv = sys.argv[:1]  # RecBole's Config also parses sys.argv; give it nothing to misread
    config = Config(model=args.model, dataset=args.dataset, config_file_list=args.config,
                    config_dict=overrides)
    init_seed(config["seed"], config["reproducibility"])
    torch.set_num_threads(args.threads)
    init_logger(config)

    t0 = time.time()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    # RecBole adds [PAD] as internal item 0; every one of our N items must be rankable.
    if dataset.item_num != args.n_items + 1:
        print(f"error: RecBole knows {dataset.item_num - 1} items, the dataset has {args.n_items}",
              file=sys.stderr)
        return 3
    if dataset.field2id_token["item_id_list"] is not dataset.field2id_token["item_id"]:
        print("error: item_id_list is not remapped with item_id (alias_of_item_id missing)",
              file=sys.stderr)
        return 3
    sizes = {s: len(d._dataset) for s, d in zip(("train", "valid", "test"),
                                                (train_data, valid_data, test_data))}

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best: dict = {}

    def keep_best(epoch, verbose=True, **_kw):
        best["state"] = copy.deepcopy(trainer.model.state_dict())
        best["epoch"] = epoch

    trainer._save_checkpoint = keep_best
    valid_curve: list[tuple[int, float]] = []
    t1 = time.time()
    best_valid_score, best_valid = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False,
        callback_fn=lambda epoch, score: valid_curve.append((int(epoch), float(score))))
    t_train = time.time() - t1
    if "state" not in best:
        print("error: RecBole never reported a best epoch", file=sys.stderr)
        return 3
    trainer.model.load_state_dict(best["state"])
    test = trainer.evaluate(test_data, load_best_model=False)
    ranks = _rows_and_ranks(trainer, test_data, dataset)
    teacher = None
    if args.teacher_top_n is not None:
        loaders = {"train": train_data, "valid": valid_data, "test": test_data}
        teacher = write_teacher(out, trainer.model, loaders, dataset, args.teacher_top_n,
                                int(config["eval_batch_size"]))

    result = {
        "model": args.model, "seed": args.seed, "best_epoch": int(best["epoch"]),
        "epochs_run": len(valid_curve), "epochs_cap": int(config["epochs"]),
        "best_valid_score": float(best_valid_score),
        "valid": {k: float(v) for k, v in best_valid.items()},
        "test": {k: float(v) for k, v in test.items()},
        "valid_curve": valid_curve, "rows": sizes, "n_items_ranked": int(dataset.item_num - 1),
        "train_seconds": round(t_train, 2), "total_seconds": round(time.time() - t0, 2),
        "threads": args.threads, "teacher": teacher, "versions": {"recbole": recbole.__version__,
                                              "torch": torch.__version__, "numpy": np.__version__},
    }
    def save_ranks(tmp):
        with open(tmp, "wb") as fh:  # a file object: np.save(str) would append ".npy"
            np.save(fh, ranks, allow_pickle=False)

    _write_atomic(out / "test_ranks.npy", save_ranks)
    _write_atomic(out / "runner.json", lambda t: Path(t).write_text(json.dumps(result, indent=2) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
