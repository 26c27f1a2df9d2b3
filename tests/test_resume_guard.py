"""``train --resume`` continues a checkpoint only under the same config and the same inputs."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from dllm2rec.bench.synthetic import synthetic_dataset, synthetic_teacher
from dllm2rec.data.dataset import load_dataset
from dllm2rec.errors import ConfigError, ManifestError
from dllm2rec.train import checkpoint as ckpt
from dllm2rec.train.loop import add_arguments, run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 1-epoch DLLM2Rec run (checkpoints/last present) plus a second teacher and dataset."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resume")
    ds = synthetic_dataset(root / "ds", n_items=30, n_train=128, n_valid=32, n_test=32)
    teacher = synthetic_teacher(root / "teacher", load_dataset(ds), top_n=10, emb_dim=8)
    other_teacher = synthetic_teacher(root / "teacher2", load_dataset(ds), top_n=10, emb_dim=8, seed=1)
    other_ds = synthetic_dataset(root / "ds2", n_items=30, n_train=128, n_valid=32, n_test=32, seed=5)
    (root / "run.yaml").write_text(
        f"data: {{path: {ds}}}\nmodel: {{name: gru4rec, hidden: 16}}\n"
        f"distill: {{teacher: {teacher}, rd: {{enabled: true, k: 5}}, ed: {{enabled: true}}}}\n"
        "train: {epochs: 1, batch_size: 64, progress: false, patience: 0}\n")
    run = root / "run"
    assert _train(root, run) == 0
    return root, run, other_teacher, other_ds


def _train(root, out, *extra, flags=()):
    """Like ``python -m dllm2rec train --config run.yaml ... [flags]``, but errors propagate."""
    args = argparse.ArgumentParser()
    add_arguments(args)
    ns = args.parse_args(["--config", str(root / "run.yaml"), f"train.output_dir={out}", *extra, *flags])
    return run(ns)


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("change,key", [
    (["distill.rd.lam=0.3"], "distill.rd.lam"),
    (["train.seed=7"], "train.seed"),
    (["model.name=sasrec"], "model.name"),
    (["distill.rd.enabled=false"], "distill.rd.enabled"),
    (["train.lr=0.01"], "train.lr"),
    (["train.epochs=2"], "train.epochs"),  # allowed only when named by --allow-change
])
def test_config_change_is_refused_and_lists_the_key(base, tmp_path, change, key):
    root, run, _, _ = base
    out = _copy_run(run, tmp_path)
    before = (out / "checkpoints/last/manifest.json").read_bytes()
    with pytest.raises(ConfigError, match=rf"cannot resume.*{key.replace('.', r'[.]')}: ") as info:
        _train(root, out, *change, flags=["--resume"])
    assert "distill.rd.lam" not in str(info.value) or key == "distill.rd.lam"  # only the differing key is listed
    assert (out / "checkpoints/last/manifest.json").read_bytes() == before  # nothing was continued


def test_other_teacher_and_dataset_are_refused(base, tmp_path):
    root, run, other_teacher, other_ds = base
    out = _copy_run(run, tmp_path)
    with pytest.raises(ConfigError, match=r"distill\.teacher: .*inputs\.teacher_sha256"):
        _train(root, out, f"distill.teacher={other_teacher}", flags=["--resume"])
    with pytest.raises(ConfigError, match=r"data\.path: .*inputs\.dataset_sha256"):
        _train(root, out, f"data.path={other_ds}", f"distill.teacher={other_teacher}", flags=["--resume"])


def test_same_path_new_content_is_refused(base, tmp_path):
    """The config is identical, but the teacher folder at the same path was rebuilt."""
    root, run, other_teacher, _ = base
    out = _copy_run(run, tmp_path)
    cfg = (root / "run.yaml").read_text()
    teacher = tmp_path / "teacher"
    shutil.copytree(other_teacher, teacher)
    saved_teacher = ckpt.load_checkpoint(out / "checkpoints/last")["inputs"]["teacher_sha256"]
    (tmp_path / "run.yaml").write_text(cfg.replace(str(root / "teacher"), str(teacher)))
    # point the copied checkpoint's config at the new path, so only the content differs
    last = out / "checkpoints/last"
    (last / "config.yaml").write_text((last / "config.yaml").read_text().replace(str(root / "teacher"), str(teacher)))
    with pytest.raises(ConfigError, match=r"differing keys: inputs\.teacher_sha256: '" + saved_teacher[:8]):
        _train(tmp_path, out, flags=["--resume"])


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the progress bar's float(loss)
def test_allowed_keys_pass_with_the_flag(base, tmp_path):
    root, run, _, _ = base
    out = _copy_run(run, tmp_path)
    assert _train(root, out, "train.epochs=2", "train.progress=true", flags=["--resume", "--allow-change", "train.epochs"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["epochs_run"] == 2  # continued from epoch 1, not restarted
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    # the run folder may move: output_dir is where the checkpoint is found, never compared
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert _train(root, moved, "train.epochs=2", flags=["--resume"]) == 0
    with pytest.raises(ConfigError, match=r"--allow-change train\.lr: only train\.epochs"):
        _train(root, moved, "train.epochs=2", "train.lr=0.5", flags=["--resume", "--allow-change", "train.lr"])


def test_old_checkpoint_schema_is_refused_clearly(base, tmp_path):
    root, run, _, _ = base
    out = _copy_run(run, tmp_path)
    m = out / "checkpoints/last/manifest.json"
    data = json.loads(m.read_text())
    data["schema"] = "dllm2rec.checkpoint/1"
    del data["inputs"]
    m.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"checkpoint schema 'dllm2rec\.checkpoint/1' records no input hashes"):
        _train(root, out, flags=["--resume"])
