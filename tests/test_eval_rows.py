"""eval.valid_rows / eval.test_rows: evaluation on a fixed sample of rows (large splits)."""
from __future__ import annotations

import json

import pytest
import torch

from dllm2rec.cli import main
from dllm2rec.config import load_config
from dllm2rec.data.dataset import load_dataset
from dllm2rec.errors import ConfigError
from dllm2rec.train.batches import SplitTensors, sample_rows


def _split(n: int) -> SplitTensors:
    r = torch.arange(n)
    return SplitTensors(history=torch.stack([r, r + 1], 1), lengths=torch.full((n,), 2), target=r * 3, row_id=r + 1000)


def test_sample_is_fixed_sorted_distinct_and_aligned():
    s = _split(500)
    a, b = sample_rows(s, 40, 0, "valid"), sample_rows(s, 40, 0, "valid")
    assert len(a) == 40 and torch.equal(a.row_id, b.row_id)
    pos = a.row_id - 1000
    assert bool((pos[1:] > pos[:-1]).all())  # split order, no repeats
    # every column comes from the same source rows
    assert torch.equal(a.target, pos * 3) and torch.equal(a.history[:, 0], pos) and torch.equal(a.history[:, 1], pos + 1)
    assert not torch.equal(sample_rows(s, 40, 0, "test").row_id, a.row_id)  # valid and test drawn independently
    assert not torch.equal(sample_rows(s, 40, 1, "valid").row_id, a.row_id)  # the seed matters


def test_zero_or_oversized_sample_is_the_whole_split():
    s = _split(30)
    assert sample_rows(s, 0, 0, "valid") is s
    assert sample_rows(s, 30, 0, "valid") is s
    assert sample_rows(s, 99, 0, "valid") is s


def test_negative_row_count_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.valid_rows"):
        load_config(None, ["eval.valid_rows=-1"])


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory):
    from dllm2rec.bench.synthetic import synthetic_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evalrows")
    ds = synthetic_dataset(root / "ds", n_items=40, n_train=192, n_valid=64, n_test=64)
    path = root / "run.yaml"
    path.write_text(f"data: {{path: {ds}}}\nmodel: {{name: gru4rec, hidden: 16}}\nloss: {{objective: ce}}\n"
                    "train: {epochs: 2, batch_size: 64, progress: false}\n")
    return path


def test_training_selects_on_the_sample_and_says_so(run_yaml, tmp_path):
    """The per-epoch valid metrics are exactly the full split's ranks restricted to the sampled
    rows; results.json, the protocol label and `evaluate --out` record the sample."""
    from safetensors.torch import load_file

    from dllm2rec.eval import metrics
    from dllm2rec.eval.evaluate import split_ranks
    from dllm2rec.train.distributed import make_accelerator
    from dllm2rec.train.inputs import load_inputs

    out = tmp_path / "run"
    assert main(["train", "--config", str(run_yaml), f"train.output_dir={out}",
                 "eval.valid_rows=20", "eval.test_rows=16"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["eval_rows"] == {"valid": 20, "test": 16}
    assert "valid on a fixed sample of 20 rows" in res["protocol"] and "test on a fixed sample of 16 rows" in res["protocol"]

    full_cfg = load_config(out / "config.yaml", ["eval.valid_rows=0", "eval.test_rows=0"])
    inputs = load_inputs(full_cfg)
    inputs.student.load_state_dict(load_file(str(out / "best" / "model.safetensors")))
    full = inputs.splits["valid"]
    ranks = split_ranks(inputs.student, full, make_accelerator(), chunk=1024, batch_size=64)
    picked = sample_rows(full, 20, 0, "valid")
    pos = torch.searchsorted(full.row_id, picked.row_id)
    expected = {k: float(v) for k, v in metrics.hr_ndcg(ranks[pos], full_cfg.eval.ks).items()}
    assert res["valid"] == pytest.approx(expected, abs=1e-6)

    assert main(["evaluate", "--run", str(out), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["rows"] == 16 and "fixed sample" in m["protocol"]
    assert m["metrics"] == pytest.approx(res["test"], abs=1e-6)


def test_whole_split_by_default(run_yaml, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(run_yaml), f"train.output_dir={out}", "train.epochs=1"]) == 0
    res = json.loads((out / "results.json").read_text())
    ds = load_dataset(load_config(run_yaml).data.path)
    assert res["eval_rows"] == {"valid": len(ds.splits["valid"]["target"]), "test": len(ds.splits["test"]["target"])}
    assert "sample" not in res["protocol"]
