"""The BIGRec / DLLM2Rec data protocol (SPEC section 1) as a pure function.

``build_rows(interactions, titles, params) -> Prepared``

Input contract:
- ``interactions``: a ``pandas.DataFrame`` with columns ``user`` (str), ``item`` (str, the raw
  item id) and ``timestamp`` (int64, >= 0), in file order. File order breaks timestamp ties.
- ``titles``: ``dict[str, str]`` raw item id -> title. Items whose title is missing, empty after
  stripping, or a known placeholder (``PLACEHOLDER_TITLES``) are dropped from the log first.

Output contract (``Prepared``):
- ``titles``: list[str], the title of dense item id ``i`` at index ``i`` (``N = len(titles)``).
- ``raw_items``: list[str], raw id of dense item ``i``.
- dense ids are assigned by SORTED RAW ID: numerically when every kept raw id is a decimal
  integer (MovieLens: raw 1 -> 0), otherwise lexicographically (Amazon ASINs). Only items that
  occur in the filtered log get an id. Padding id = ``N``.
- ``splits[name]``: dict of numpy arrays, one entry per row:
  ``row_id`` int64 [R] (position in the global time order, unique over all splits),
  ``user`` object [R] (raw user id), ``history`` int64 [R, L] (oldest first, right-padded with N),
  ``history_len`` int64 [R] in 1..L, ``target`` int64 [R] in 0..N-1, ``timestamp`` int64 [R].

Windows: a user's interactions are stably sorted by timestamp (file order breaks ties). With
n interactions, targets are the positions p = max(min_history, min(L, n-1)) .. n-1; each
target's history is the up-to-L items before it. ``min_history=1`` is the BIGRec protocol
(users with n <= L give one row with n-1 history items, users with one interaction none);
``min_history=L`` is the MovieLens variant of the paper (only positions >= L, always L items).

Split: all rows are sorted by (target timestamp, user, position) -- users ordered like the
dense ids (numeric when possible) -- and cut at floor(train_frac * R) and
floor((train_frac + valid_frac) * R), computed exactly with decimal fractions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
import pandas as pd

from dllm2rec.errors import DataError

SPLITS = ("train", "valid", "test")
# Titles that name no item: the teacher could never ground them, so the item counts as untitled.
PLACEHOLDER_TITLES = frozenset({"unknown", "unkonwn", "n/a", "none", "null", "nan"})


@dataclass(frozen=True)
class ProtocolParams:
    max_history: int = 10
    min_history: int = 1
    train_frac: float = 0.8
    valid_frac: float = 0.1

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if not 1 <= self.min_history <= self.max_history:
            raise ValueError(f"min_history must be in 1..max_history, got {self.min_history}")
        if not (0 < self.train_frac < 1 and 0 <= self.valid_frac < 1
                and self.train_frac + self.valid_frac <= 1):
            raise ValueError("need 0 < train_frac < 1, 0 <= valid_frac, train_frac + valid_frac <= 1")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    titles: list[str]
    raw_items: list[str]
    splits: dict[str, dict[str, np.ndarray]]
    params: ProtocolParams
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.titles)


def usable_title(title: object) -> str | None:
    """Return the cleaned title (whitespace runs incl. tabs/newlines -> one space) or None."""
    if not isinstance(title, str):
        return None
    clean = " ".join(title.split())
    if not clean or clean.lower() in PLACEHOLDER_TITLES:
        return None
    return clean


def _canonical_codes(codes: np.ndarray, uniques: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-number factorised values in canonical order: numeric when every used value is an ASCII
    decimal integer, else lexicographic. Returns (ordered distinct values, int64 codes)."""
    used = np.unique(codes)
    vals = uniques[used]
    if all(v.isascii() and v.isdigit() for v in vals):
        order = sorted(range(len(vals)), key=lambda k: (int(vals[k]), vals[k]))
    else:
        order = sorted(range(len(vals)), key=lambda k: vals[k])
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[used[order]] = np.arange(len(order))
    return vals[order], rank[codes] if len(codes) else np.zeros(0, np.int64)


def split_bounds(n_rows: int, params: ProtocolParams) -> tuple[int, int]:
    """(end of train, end of valid) = floor(train_frac R), floor((train_frac + valid_frac) R), exact."""
    tf = Fraction(str(params.train_frac))
    vf = tf + Fraction(str(params.valid_frac))
    return int(tf * n_rows), int(vf * n_rows)  # int() of a non-negative Fraction is its floor


def build_rows(interactions: pd.DataFrame, titles: dict[str, str],
               params: ProtocolParams = ProtocolParams(), source: str = "<interactions>") -> Prepared:
    """Apply the protocol; see the module docstring for the exact contract."""
    for col in ("user", "item", "timestamp"):
        if col not in interactions.columns:
            raise DataError(source, f"missing column {col!r}")
    users = interactions["user"].to_numpy(dtype=object)
    items = interactions["item"].to_numpy(dtype=object)
    ts = interactions["timestamp"].to_numpy()
    if ts.dtype.kind not in "iu":
        raise DataError(source, f"timestamps must be integers, got dtype {ts.dtype}")
    ts = ts.astype(np.int64)
    if len(ts) and ts.min() < 0:
        bad = int(np.argmax(ts < 0))
        raise DataError(source, f"negative timestamp {ts[bad]}", row=bad + 1)

    clean = {k: t for k, t in ((str(k), usable_title(v)) for k, v in titles.items()) if t is not None}
    # Hash-factorise once, then decide per distinct item (fast on 10M-row logs).
    icodes, iuniq = pd.factorize(items)
    iuniq = np.array([str(x) for x in iuniq], dtype=object)
    keep = np.array([x in clean for x in iuniq], dtype=bool)[icodes] if len(icodes) else np.zeros(0, bool)
    stats = {"interactions_in": int(len(items)), "interactions_dropped_untitled": int((~keep).sum()),
             "items_dropped_untitled": int(len(np.unique(icodes[~keep])))}
    item_order, item_id = _canonical_codes(icodes[keep], iuniq)
    ucodes, uuniq = pd.factorize(users[keep])
    user_order, user_idx = _canonical_codes(ucodes, np.array([str(x) for x in uuniq], dtype=object))
    ts = ts[keep]

    n_items = len(item_order)
    pad = n_items
    L = params.max_history
    # Per-user stable time order: lexsort keys go last-is-primary; file order breaks ties.
    order = np.lexsort((np.arange(len(ts)), ts, user_idx))
    u_s, i_s, t_s = user_idx[order], item_id[order].astype(np.int64), ts[order]
    starts = np.flatnonzero(np.r_[True, u_s[1:] != u_s[:-1]]) if len(u_s) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(u_s)])
    pos = np.arange(len(u_s)) - np.repeat(starts, counts)
    n_of = np.repeat(counts, counts)
    first_target = np.maximum(params.min_history, np.minimum(L, n_of - 1))
    is_target = pos >= first_target
    tgt = np.flatnonzero(is_target)
    h = np.minimum(pos[tgt], L)
    j = np.arange(L)
    src = tgt[:, None] - h[:, None] + j[None, :]
    hist = np.where(j[None, :] < h[:, None], i_s[np.clip(src, 0, max(len(i_s) - 1, 0))], pad)

    # Global order: target timestamp, then user, then position (deterministic tie-break).
    g = np.lexsort((pos[tgt], u_s[tgt], t_s[tgt]))
    n_rows = len(g)
    b1, b2 = split_bounds(n_rows, params)
    cols = {
        "row_id": np.arange(n_rows, dtype=np.int64),
        "user": user_order[u_s[tgt][g]].astype(object) if n_rows else np.zeros(0, dtype=object),
        "history": hist[g].astype(np.int64).reshape(n_rows, L),
        "history_len": h[g].astype(np.int64),
        "target": i_s[tgt][g].astype(np.int64),
        "timestamp": t_s[tgt][g].astype(np.int64),
    }
    bounds = {"train": (0, b1), "valid": (b1, b2), "test": (b2, n_rows)}
    splits = {name: {k: v[a:b] for k, v in cols.items()} for name, (a, b) in bounds.items()}
    stats.update({"users": int(len(user_order)), "interactions_kept": int(keep.sum()), "rows": int(n_rows)})
    return Prepared(titles=[clean[r] for r in item_order.astype(str)], raw_items=[str(r) for r in item_order],
                    splits=splits, params=params, stats=stats)
