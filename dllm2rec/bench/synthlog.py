"""Synthetic interaction logs with realistic skew, written as RecBole atomic files.

``write_log(out, interactions, items, seed)`` writes ``<out>/synthetic.inter`` (header
``user_id:token  item_id:token  rating:float  timestamp:float``) and ``<out>/synthetic.item``
(``item_id:token  title:token_seq``), the format ``python -m dllm2rec data prepare --source recbole``
reads. Exactly ``interactions`` lines, written in chunks of users (memory O(chunk), not O(log)).

Skew (what makes it realistic, both seen in public logs such as Amazon and MovieLens):
- items: Zipf popularity, P(item of popularity rank k) ~ 1 / (k + 1) ** ``item_exponent``
  (default 1.0); ranks are mapped to raw ids by a seeded permutation, so popular items are not
  simply the small ids;
- users: long-tail activity, lengths ~ 2 + floor(lognormal(mu, ``user_sigma``)) with mu chosen so
  that the mean length is about ``mean_user_length``; the last user is cut so that the total is exact.
Timestamps: each user starts at a uniform time in [0, 10^8) and advances by 1..86400 s per
interaction. The output is a pure function of the arguments: same seed, same bytes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\ttitle:token_seq\n"
_CHUNK_USERS = 65536


def user_lengths(interactions: int, mean_user_length: float, user_sigma: float, rng) -> np.ndarray:
    """Interactions per user (each >= 2 except possibly the cut last one), summing to ``interactions``."""
    if interactions < 2:
        raise ValueError(f"interactions must be >= 2, got {interactions}")
    if mean_user_length < 3:
        raise ValueError(f"mean_user_length must be >= 3, got {mean_user_length}")
    mu = math.log(mean_user_length - 2 + 0.5) - user_sigma ** 2 / 2  # E[lognormal] = mean - 2 (+0.5: floor)
    parts, total = [], 0
    while total < interactions:
        n = max(1024, int((interactions - total) / mean_user_length * 1.1))
        lens = 2 + np.floor(rng.lognormal(mu, user_sigma, n)).astype(np.int64)
        parts.append(lens)
        total += int(lens.sum())
    lens = np.concatenate(parts)
    cum = np.cumsum(lens)
    last = int(np.searchsorted(cum, interactions))  # first user whose cumulative count reaches the total
    lens = lens[:last + 1].copy()
    lens[-1] -= int(cum[last]) - interactions
    return lens


def item_sampler(items: int, exponent: float, rng):
    """(cdf over popularity ranks, rank -> raw item id) for Zipf sampling."""
    if items < 2:
        raise ValueError(f"items must be >= 2, got {items}")
    w = 1.0 / np.arange(1, items + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return cdf, rng.permutation(items)


def write_log(out: str | Path, interactions: int, items: int, seed: int = 0, item_exponent: float = 1.0,
              mean_user_length: float = 20.0, user_sigma: float = 1.0) -> dict:
    """Write the two files atomically; returns ``{"inter", "item", "users", "interactions", "items"}``."""
    import pandas as pd

    from dllm2rec.atomic import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 0x106])
    lens = user_lengths(interactions, mean_user_length, user_sigma, rng)
    cdf, raw_of_rank = item_sampler(items, item_exponent, rng)
    inter, item = out / "synthetic.inter", out / "synthetic.item"
    with atomic_path(inter) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(INTER_HEADER)
        for u0 in range(0, len(lens), _CHUNK_USERS):
            cl = lens[u0:u0 + _CHUNK_USERS]
            n = int(cl.sum())
            users = np.repeat(np.arange(u0, u0 + len(cl), dtype=np.int64), cl)
            ranks = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), items - 1)
            starts = np.repeat(rng.integers(0, 10 ** 8, len(cl)), cl)
            gaps = rng.integers(1, 86401, n)
            first = np.repeat(np.cumsum(cl) - cl, cl)  # offset of each row's user in the chunk
            csum = np.cumsum(gaps)
            ts = starts + csum - csum[first] + gaps[first]  # per-user running sum of gaps
            frame = pd.DataFrame({"u": users, "i": raw_of_rank[ranks], "r": 1, "t": ts})
            frame.to_csv(fh, sep="\t", header=False, index=False, lineterminator="\n")
    with atomic_path(item) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(ITEM_HEADER)
        ids = np.arange(items)
        pd.DataFrame({"i": ids, "t": [f"Item {i}" for i in ids]}).to_csv(
            fh, sep="\t", header=False, index=False, lineterminator="\n")
    return {"inter": str(inter), "item": str(item), "users": int(len(lens)), "interactions": int(interactions),
            "items": int(items)}
