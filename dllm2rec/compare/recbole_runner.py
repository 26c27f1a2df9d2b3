"""Train and test ONE RecBole 1.2.1 model on an exported split; run with the RecBole venv's python.

This file is executed as a script by ``dllm2rec/compare/recbole.py`` with the OPTIONAL RecBole
venv (``launch/recbole_env.sh``: numpy < 2, recbole==1.2.1). It imports only the standard
library, numpy, torch and recbole -- never the ``dllm2rec`` package, whose dependencies live in
the main venv.

    python recbole_runner.py --data-path D --dataset NAME --model SASRec --seed 0 \
        --config base.yaml --config sasrec.yaml --out RUN_DIR [--epochs 50] [--threads 1]

Writes (temp + rename) into RUN_DIR:
- ``runner.json``: RecBole's best valid result, its test result at the best-valid epoch (the
  best-valid weights are restored before testing), best epoch, epochs run, per-epoch valid
  score, item/row counts, timings, versions;
- ``test_ranks.npy`` int64 [R_test, 2]: (row_id, 1-based rank of the target among all N items
  under RecBole's scores) so the caller can recompute HR/NDCG with OUR definitions.

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
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

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

    result = {
        "model": args.model, "seed": args.seed, "best_epoch": int(best["epoch"]),
        "epochs_run": len(valid_curve), "epochs_cap": int(config["epochs"]),
        "best_valid_score": float(best_valid_score),
        "valid": {k: float(v) for k, v in best_valid.items()},
        "test": {k: float(v) for k, v in test.items()},
        "valid_curve": valid_curve, "rows": sizes, "n_items_ranked": int(dataset.item_num - 1),
        "train_seconds": round(t_train, 2), "total_seconds": round(time.time() - t0, 2),
        "threads": args.threads, "versions": {"recbole": recbole.__version__,
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
