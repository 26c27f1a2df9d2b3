"""`teacher bench --compare`: the alternating timer and the pair selection (no LLM here)."""
from __future__ import annotations

import time

import pytest

from teacher.bench_compare import alternate, run_compare


def test_alternate_interleaves_old_and_new_after_one_warmup_each():
    calls = []

    def old():
        calls.append("old")
        time.sleep(0.002)

    def new():
        calls.append("new")

    t_old, t_new = alternate(old, new, repeats=3)
    assert calls == ["old", "new"] * 4  # warm-up round, then strictly alternating timed runs
    assert t_old >= 0.002 > t_new >= 0.0


def test_alternate_reports_medians_not_means():
    durations = iter([0, 0, 0.001, 0, 0.05, 0, 0.001, 0])  # warm-up pair, then one slow outlier

    def old():
        time.sleep(next(durations))

    def new():
        next(durations)

    t_old, _ = alternate(old, new, repeats=3)
    assert len(alternate(int, int, int, repeats=1)) == 3  # any number of paths
    assert t_old < 0.02  # the 0.05 s outlier is not the median


def test_unknown_pair_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown pair"):
        run_compare(None, None, 4, 4, 1, str(tmp_path / "t.md"), ["finetune", "beam"])
    assert not (tmp_path / "t.md").exists()
