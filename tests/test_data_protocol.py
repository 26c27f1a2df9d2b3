"""Windowing, split sizes and id assignment of the data protocol (SPEC section 1)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllm2rec.data.protocol import ProtocolParams, build_rows, split_bounds


def _log(rows):
    return pd.DataFrame({"user": [r[0] for r in rows], "item": [r[1] for r in rows],
                         "timestamp": pd.Series([r[2] for r in rows], dtype="int64")})


# Hand-built log, L = 3. Item "h" has no title and must vanish; "u3" has one item (no row).
HAND = [
    ("u1", "c", 30), ("u1", "a", 10), ("u1", "e", 50), ("u1", "b", 20), ("u1", "d", 40),
    ("u2", "f", 15), ("u2", "g", 15),            # tie: file order decides (f before g)
    ("u3", "a", 1),
    ("u4", "a", 5), ("u4", "h", 6), ("u4", "b", 7),
    ("u5", "c", 1), ("u5", "d", 2), ("u5", "e", 3),
]
TITLES = {k: f"title {k}" for k in "abcdefg"} | {"h": "   "}


def _all(prep):
    return {k: np.concatenate([prep.splits[s][k] for s in ("train", "valid", "test")])
            for k in prep.splits["train"]}


def test_hand_built_windows_and_order():
    prep = build_rows(_log(HAND), TITLES, ProtocolParams(max_history=3))
    assert prep.titles == [f"title {k}" for k in "abcdefg"]  # sorted raw ids a..g -> 0..6, h dropped
    P = 7
    rows = _all(prep)
    # global order by target time: u5@3, u4@7, u2@15, u1@40, u1@50
    assert rows["user"].tolist() == ["u5", "u4", "u2", "u1", "u1"]
    assert rows["timestamp"].tolist() == [3, 7, 15, 40, 50]
    assert rows["target"].tolist() == [4, 1, 6, 3, 4]
    assert rows["history_len"].tolist() == [2, 1, 1, 3, 3]
    assert rows["history"].tolist() == [[2, 3, P], [0, P, P], [5, P, P], [0, 1, 2], [1, 2, 3]]
    assert rows["row_id"].tolist() == [0, 1, 2, 3, 4]
    # R = 5: floor(4.0) = 4 train, floor(4.5) = 4 -> 0 valid, 1 test
    assert [len(prep.splits[s]["target"]) for s in ("train", "valid", "test")] == [4, 0, 1]
    assert prep.stats["interactions_dropped_untitled"] == 1


def test_min_history_variant_keeps_only_full_windows():
    prep = build_rows(_log(HAND), TITLES, ProtocolParams(max_history=3, min_history=3))
    rows = _all(prep)
    assert rows["user"].tolist() == ["u1", "u1"]
    assert rows["history_len"].tolist() == [3, 3]


def test_long_user_gives_one_row_per_position_from_L():
    log = _log([("u", str(i), i) for i in range(25)])
    rows = _all(build_rows(log, {str(i): f"t{i}" for i in range(25)}, ProtocolParams(max_history=10)))
    assert len(rows["target"]) == 15
    assert rows["target"].tolist() == list(range(10, 25))
    assert rows["history"][0].tolist() == list(range(10))
    assert rows["history"][-1].tolist() == list(range(14, 24))


def test_numeric_raw_ids_sort_numerically():
    log = _log([("1", "100", 1), ("1", "9", 2), ("1", "10", 3)])
    prep = build_rows(log, {"9": "nine", "10": "ten", "100": "hundred"})
    assert prep.raw_items == ["9", "10", "100"]
    assert prep.titles == ["nine", "ten", "hundred"]


@pytest.mark.parametrize("R,expected", [(10, (8, 9)), (1, (0, 0)), (19, (15, 17)), (90561, (72448, 81504)), (0, (0, 0))])
def test_split_bounds_are_exact_floors(R, expected):
    assert split_bounds(R, ProtocolParams()) == expected


def _naive(log: pd.DataFrame, titles: dict, L: int):
    """Straightforward per-user loop implementation of the protocol, for comparison."""
    keep = [(u, i, t, k) for k, (u, i, t) in enumerate(zip(log.user, log.item, log.timestamp)) if titles.get(i, "").strip()]
    items = sorted({i for _, i, _, _ in keep})
    iid = {i: k for k, i in enumerate(items)}
    users = sorted({u for u, _, _, _ in keep})
    rows = []
    for ui, u in enumerate(users):
        seq = sorted([(t, k, i) for uu, i, t, k in keep if uu == u])
        for p in range(min(L, len(seq) - 1) if len(seq) > 1 else 1, len(seq)):
            hist = [iid[x[2]] for x in seq[max(0, p - L):p]]
            rows.append((seq[p][0], ui, p, hist + [len(items)] * (L - len(hist)), iid[seq[p][2]]))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return items, rows


log_strategy = st.lists(
    st.tuples(st.sampled_from(["u1", "u2", "u3", "u4", "u5"]), st.sampled_from(list("abcdefgh")),
              st.integers(0, 12)),
    max_size=60)


@settings(max_examples=60, deadline=None)
@given(log_strategy, st.integers(1, 4))
def test_property_random_logs(entries, L):
    log = _log(entries)
    titles = {k: f"t-{k}" for k in "abcdefg"}  # "h" has no title
    prep = build_rows(log, titles, ProtocolParams(max_history=L))
    rows = _all(prep)
    items, expected = _naive(log, titles, L)
    # ids dense over the kept log, titles aligned
    assert prep.titles == [titles[i] for i in items]
    assert rows["target"].tolist() == [r[4] for r in expected]
    assert rows["history"].tolist() == [r[3] for r in expected]
    assert rows["timestamp"].tolist() == [r[0] for r in expected]
    # every history item precedes its target in that user's time order (ts <= target ts)
    ts_of = {}
    for u, i, t in entries:
        if i != "h":
            ts_of.setdefault((u, items.index(i)), []).append(t)
    for u, h, n, tgt, t in zip(rows["user"], rows["history"], rows["history_len"], rows["target"], rows["timestamp"]):
        assert all(min(ts_of[(u, x)]) <= t for x in h[:n])
        assert np.all(h[n:] == len(items))
    # splits disjoint, time ordered, sizes are the exact floors
    R = len(rows["target"])
    b1, b2 = split_bounds(R, prep.params)
    sizes = [len(prep.splits[s]["target"]) for s in ("train", "valid", "test")]
    assert sizes == [b1, b2 - b1, R - b2]
    assert len(set(rows["row_id"].tolist())) == R
    tr, va, te = (prep.splits[s]["timestamp"] for s in ("train", "valid", "test"))
    if len(tr) and len(va):
        assert tr.max() <= va.min()
    if len(va) and len(te):
        assert va.max() <= te.min()
    again = _all(build_rows(log, titles, ProtocolParams(max_history=L)))
    assert all(np.array_equal(rows[k], again[k]) for k in rows)


numeric_log = st.lists(
    st.tuples(st.sampled_from(["7", "30", "100", "2"]), st.integers(1, 40).map(str), st.integers(0, 9)),
    max_size=80)


@settings(max_examples=60, deadline=None)
@given(numeric_log, st.integers(1, 5), st.data())
def test_property_invariants_checked_against_the_raw_log(entries, L, data):
    """Invariants asserted directly against the raw log (not against a second implementation):
    each row is a window of its user's time-ordered log ending at the target, history strictly
    earlier in that order; ids dense and numeric-sorted; splits disjoint, time-ordered, row ids
    = global time order; any min_history / fractions; re-running gives identical output."""
    m = data.draw(st.integers(1, L))
    tf = data.draw(st.sampled_from([0.5, 0.6, 0.8, 0.9]))
    vf = data.draw(st.sampled_from([0.0, 0.05, 0.1]))
    params = ProtocolParams(max_history=L, min_history=m, train_frac=tf, valid_frac=vf)
    titles = {str(i): f"t{i}" for i in range(1, 41) if i % 7}  # multiples of 7 are untitled -> dropped
    log = _log(entries)
    prep = build_rows(log, titles, params)
    rows = _all(prep)
    N = prep.n_items
    kept = [(u, i, t, k) for k, (u, i, t) in enumerate(entries) if i in titles]
    # dense ids: exactly the titled items of the log, numerically sorted raw ids, 0..N-1
    assert prep.raw_items == sorted({i for _, i, _, _ in kept}, key=int)
    assert prep.titles == [titles[r] for r in prep.raw_items]
    used = np.concatenate([rows["target"], rows["history"][rows["history"] < N]]) if len(rows["target"]) else np.zeros(0)
    assert ((used >= 0) & (used < N)).all()
    # every row is a window of the user's stable time order; history precedes the target
    seq = {}
    for u, i, t, k in sorted(kept, key=lambda x: (x[0], x[2], x[3])):
        seq.setdefault(u, []).append((prep.raw_items.index(i), t))
    seen = set()
    for u, h, n, tgt, ts in zip(rows["user"], rows["history"], rows["history_len"], rows["target"], rows["timestamp"]):
        s = seq[u]
        pos = [p for p in range(len(s)) if s[p] == (tgt, ts) and p >= max(m, min(L, len(s) - 1))
               and [x for x, _ in s[max(0, p - L):p]] == h[:n].tolist() and (u, p) not in seen]
        assert pos, (u, h, n, tgt)
        p = pos[0]
        seen.add((u, p))
        assert n == min(p, L) and all(t0 <= ts for _, t0 in s[p - n:p])
        assert (h[n:] == N).all()
    # all eligible positions became rows (nothing lost)
    assert len(seen) == sum(max(0, len(s) - max(m, min(L, len(s) - 1))) for s in seq.values())
    # splits: exact floors, disjoint row ids = global time order, time-ordered
    R = len(rows["target"])
    assert rows["row_id"].tolist() == list(range(R))
    assert (np.diff(rows["timestamp"]) >= 0).all()
    b1, b2 = split_bounds(R, params)
    assert [len(prep.splits[s]["target"]) for s in ("train", "valid", "test")] == [b1, b2 - b1, R - b2]
    again = build_rows(log, titles, params)
    assert again.titles == prep.titles and again.raw_items == prep.raw_items
    assert all(np.array_equal(np.asarray(rows[k]), np.asarray(_all(again)[k])) for k in rows)
