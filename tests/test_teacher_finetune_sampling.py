"""Which training prompts the LoRA fine-tune sees (issue 14, item 4), and how varied the teacher's
answers are: ``teacher.finetune_data.sample_balanced`` / ``target_coverage``, the
``sample_strategy`` config keys and their effect on ``config_identity``, and
``teacher.artifacts.output_diversity``. Tiny arrays built in the tests; no model is loaded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dllm2rec.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def skewed_targets(n_rows: int = 3000, n_items: int = 200, seed: int = 0) -> np.ndarray:
    """Zipf-like target ids: item 0 is ~20x as frequent as item 20, most items are rare."""
    p = 1.0 / np.arange(1, n_items + 1) ** 1.1
    return np.random.default_rng(seed).choice(n_items, size=n_rows, p=p / p.sum()).astype(np.int64)


def test_balanced_sample_is_seeded_capped_and_covers_more_targets_than_uniform():
    from teacher.finetune_data import sample_balanced, sample_rows, target_coverage

    t = skewed_targets()
    a, b, c = sample_balanced(t, 150, 2, 7), sample_balanced(t, 150, 2, 7), sample_balanced(t, 150, 2, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.int64 and len(a) == 150 and np.all(np.diff(a) > 0) and a.max() < len(t)
    assert np.bincount(t[a]).max() <= 2
    uniform = sample_rows(len(t), 150, 7)
    bal_cov, uni_cov = target_coverage(t[a], 200), target_coverage(t[uniform], 200)
    assert bal_cov["distinct_targets"] > uni_cov["distinct_targets"] + 20, (bal_cov, uni_cov)
    assert uni_cov["max_rows_per_target"] > 2  # the popular head dominates the uniform sample


def test_balanced_sample_spreads_evenly_and_prefers_rare_targets():
    from teacher.finetune_data import sample_balanced

    t = skewed_targets()
    present = np.unique(t)
    # room for one row of every target plus 10: every target (the rarest included) gets its first
    # row before any target gets a third, and exactly 10 targets get a second
    rows = sample_balanced(t, len(present) + 10, 5, 0)
    counts = np.bincount(t[rows], minlength=200)[present]
    assert counts.min() == 1 and counts.max() == 2 and int((counts == 2).sum()) == 10
    # those 10 second rows go to targets that have a second row to give
    assert np.all(np.bincount(t, minlength=200)[present][counts == 2] >= 2)


def test_balanced_sample_returns_fewer_rows_when_the_cap_binds():
    from teacher.finetune_data import sample_balanced

    t = np.repeat(np.arange(5), 10)  # 5 targets x 10 rows
    rows = sample_balanced(t, 100, 2, 0)
    assert len(rows) == 10 and np.array_equal(np.bincount(t[rows]), np.full(5, 2))
    assert len(np.unique(rows)) == 10
    with pytest.raises(DataError, match="no rows"):
        sample_balanced(np.array([], dtype=np.int64), 4, 1, 0)
    with pytest.raises(DataError, match="max_per_target"):
        sample_balanced(t, 4, 0, 0)


def test_target_coverage_on_a_toy_case():
    from teacher.finetune_data import target_coverage

    assert target_coverage([0, 0, 1, 3, 0], 10) == {"distinct_targets": 3, "target_coverage": 0.3,
                                                    "max_rows_per_target": 3}
    assert target_coverage([], 10) == {"distinct_targets": 0, "target_coverage": 0.0, "max_rows_per_target": 0}
    with pytest.raises(DataError, match="n_items"):
        target_coverage([1], 0)


def test_uniform_path_is_unchanged():
    """The rows and the config identity of a ``uniform`` run are those computed before
    ``sample_strategy`` existed (hashes taken from the code at commit 475cf29), so finished
    fine-tunes are still found and reused."""
    from teacher.finetune import config_identity, load_finetune_config
    from teacher.finetune_data import sample_rows

    assert hashlib.sha256(sample_rows(1000, 64, 3).tobytes()).hexdigest() == \
        "2ff550a3642a59de894f89cfd843e26aab4369657bd7cba8d191475814b09997"
    default = load_finetune_config(None)
    assert default.sample_strategy == "uniform"
    assert config_identity(default) == "620cdea00a37a7659ad3150fb27685334309f3dbdf1cae56478fffcf58ccac79"
    # mixed_precision pinned to the value the config held at 475cf29 (it now says `auto`, a new identity)
    demo = load_finetune_config(ROOT / "launch/configs/teacher_finetune_ml100k.yaml",
                                ["train_on_inputs=false", "lr=5e-4", "mixed_precision=bf16"])
    assert config_identity(demo) == "a2f97f7d535ab15ef3d68347f4ced33d94d871ec1a8cc60dab1e83fbace3ab0b"
    # max_per_target means nothing under uniform; under balanced both keys are identity
    assert config_identity(load_finetune_config(None, ["max_per_target=4"])) == config_identity(default)
    bal = load_finetune_config(None, ["sample_strategy=balanced"])
    bal4 = load_finetune_config(None, ["sample_strategy=balanced", "max_per_target=4"])
    assert len({config_identity(default), config_identity(bal), config_identity(bal4)}) == 3


@pytest.mark.parametrize("override, key", [
    ("sample_strategy=popular", "sample_strategy"), ("max_per_target=0", "max_per_target"),
    ("max_per_target=many", "max_per_target"),
])
def test_config_rejects_bad_sampling_values(override, key):
    from teacher.finetune import load_finetune_config

    with pytest.raises(ConfigError, match=key):
        load_finetune_config(None, [override])


def test_output_diversity_counts_distinct_texts_and_top1_items():
    pa = pytest.importorskip("pyarrow")
    from teacher.artifacts import output_diversity

    top = pa.chunked_array([pa.array([[3, 1], [3, 2]]), pa.array([[5, 3], [1, 3]])])
    gen = pa.chunked_array([pa.array(["A (1990)", "A (1990)"]), pa.array(["B (1991)", "A (1990)"])])
    assert output_diversity(gen, top) == {"rows": 4, "distinct_generated": 2, "distinct_top1": 3}
    assert output_diversity(None, top)["distinct_generated"] is None  # a ranking-only teacher
    empty = pa.chunked_array([], type=pa.list_(pa.int64()))
    assert output_diversity(None, empty) == {"rows": 0, "distinct_generated": None, "distinct_top1": 0}
