"""The demo's stage commands: every command it would run parses with the project's own configs."""
from __future__ import annotations

import shlex

import pytest

from dllm2rec.cli import main
from dllm2rec.config import load_config
from teacher.config import load_teacher_config
from teacher.finetune import load_finetune_config


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_demo_commands_use_valid_configs(profile, tmp_path, capsys):
    assert main(["demo", "--dry-run", "--profile", profile, "--out", str(tmp_path / "d"),
                 "--students", "sasrec", "gru4rec"]) == 0
    lines = [shlex.split(l) for l in capsys.readouterr().out.splitlines() if " -m " in l]
    phases = [(c[2], c[3]) for c in lines]
    assert ("dllm2rec", "data") in phases and ("teacher", "finetune") in phases and ("teacher", "run") in phases
    trains = [c for c in lines if c[2:4] == ["dllm2rec", "train"]]
    assert len(trains) == 4  # two students, without and with DLLM2Rec
    for c in lines:
        cfg_at = c.index("--config") + 1 if "--config" in c else None
        if cfg_at is None:
            continue
        overrides = [a for a in c[cfg_at + 1:] if "=" in a and not a.startswith("-")]
        if c[2:4] == ["teacher", "run"]:
            t = load_teacher_config(c[cfg_at], overrides)
            want = (2048, 512) if profile == "cpu" else (0, 0)
            assert (t.limits.train, t.limits.test) == want
            assert t.model.adapter.endswith("teacher_merged")
        elif c[2:4] == ["teacher", "finetune"]:
            f = load_finetune_config(c[cfg_at], overrides)
            assert f.sample_size == (256 if profile == "cpu" else 1024)
        elif c[2:4] == ["dllm2rec", "train"]:
            r = load_config(c[cfg_at], overrides)
            distilled = r.distill.rd.enabled
            assert r.distill.ed.enabled == distilled
            assert r.distill.min_coverage == (0.0 if distilled and profile == "cpu" else 1.0)
