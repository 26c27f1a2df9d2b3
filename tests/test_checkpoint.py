"""Checkpoint round-trip without pickle: model, optimizer, RNG states of every rank, position."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dllm2rec.train import checkpoint as ckpt
from dllm2rec.errors import ManifestError


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_round_trip_restores_training_exactly(tmp_path):
    model, opt = _trained()
    x = torch.randn(5, 4)
    rngs = [ckpt.rng_state(), ckpt.rng_state()]
    state = {"epoch": 3, "step": 7, "best_value": 0.25, "history": [{"epoch": 0}]}
    ckpt.save_checkpoint(tmp_path / "last", model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                         rng_states=rngs, state=state, config_text="a: 1\n")
    expected_next = torch.rand(3)
    np_next, py_next = np.random.rand(), random.random()

    saved = ckpt.load_checkpoint(tmp_path / "last")
    assert saved["state"] == state and saved["world_size"] == 2 and saved["config_text"] == "a: 1\n"
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    ckpt.set_rng_state(saved["rng"][1])
    assert torch.equal(torch.rand(3), expected_next)
    assert np.random.rand() == np_next and random.random() == py_next
    for m, o in ((model, opt), (model2, opt2)):  # one more identical step on both
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_no_pickle_on_disk(tmp_path):
    model, opt = _trained()
    ckpt.save_checkpoint(tmp_path / "c", model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                         rng_states=[ckpt.rng_state()], state={"epoch": 0}, config_text="")
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["config.yaml", "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng.json", "rng.safetensors", "state.json"]
    for p in (tmp_path / "c").iterdir():  # safetensors or plain UTF-8 text, nothing else
        data = p.read_bytes()
        if p.suffix == ".safetensors":
            assert data[8:9] == b"{", p
        else:
            data.decode("utf-8")


def test_flatten_keeps_key_types_and_tuples():
    obj = {"state": {0: {"step": torch.tensor(3.0)}}, "t": (1, "a", None), "arr": np.arange(3)}
    tensors = {}
    back = ckpt.unflatten(ckpt.flatten(obj, tensors), tensors)
    assert list(back["state"]) == [0] and back["t"] == (1, "a", None)
    assert np.array_equal(back["arr"], np.arange(3))
    with pytest.raises(TypeError, match="without pickle"):
        ckpt.flatten({"x": object()}, {})


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "last").mkdir()
    with pytest.raises(ManifestError, match="no manifest.json"):
        ckpt.load_checkpoint(tmp_path / "last")
