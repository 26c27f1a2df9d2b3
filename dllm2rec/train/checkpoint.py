"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

``checkpoints/last/`` (replaced atomically as a whole folder, manifest last) holds

| file | content |
|---|---|
| `model.safetensors` | student weights (unwrapped) |
| `optimizer.safetensors` + `optimizer.json` | optimizer state: tensors + the JSON skeleton that places them |
| `rng.safetensors` + `rng.json` | torch / numpy / python RNG states of EVERY rank |
| `state.json` | data position (epoch, step), global step, early-stopping state, epoch loss sums |
| `config.yaml` | the resolved run config |
| `manifest.json` | schema, written last |

Nested Python state is flattened by ``flatten``: tensors (and numpy arrays) go to a flat
``{name: tensor}`` dict, the rest is JSON with ``{"__tensor__": name}`` placeholders; dicts keep
their key types (optimizer state is keyed by int) and tuples stay tuples. Loading never
unpickles: ``safetensors`` + ``json`` only (``torch.load`` is not used at all here).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest
from dllm2rec.errors import ManifestError

SCHEMA = "dllm2rec.checkpoint/1"

# Plain-attribute objects that DeepSpeed ZeRO optimizer states contain. Stored as their attribute
# dicts and rebuilt without calling any constructor; nothing outside this list is accepted.
_OBJECTS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def _object_class(qualname: str):
    import importlib

    if qualname not in _OBJECTS:
        raise ManifestError(f"checkpoint names an object type {qualname!r} that is not allowed")
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def flatten(obj, tensors: dict, prefix: str = "t"):
    """Return a JSON-able skeleton of ``obj``; tensors are moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}.{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"{prefix}.{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, prefix), flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors, prefix) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    qualname = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if qualname in _OBJECTS:
        return {"__object__": qualname, "attrs": flatten(dict(vars(obj)), tensors, prefix)}
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint without pickle")


def unflatten(skel, tensors: dict):
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__ndarray__" in skel:
            return tensors[skel["__ndarray__"]].numpy()
        if "__tuple__" in skel:
            return tuple(unflatten(v, tensors) for v in skel["__tuple__"])
        if "__object__" in skel:
            cls = _object_class(skel["__object__"])
            obj = cls.__new__(cls)
            obj.__dict__.update(unflatten(skel["attrs"], tensors))
            return obj
        if "__dict__" in skel:
            return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in skel["__dict__"]}
        raise ManifestError(f"checkpoint skeleton has an unknown object {sorted(skel)}")
    if isinstance(skel, list):
        return [unflatten(v, tensors) for v in skel]
    return skel


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k


def save_tree(obj, stem: Path) -> None:
    """``obj`` -> ``stem.safetensors`` + ``stem.json`` (inside a folder that is written atomically)."""
    tensors: dict = {}
    skel = flatten(obj, tensors)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(skel), encoding="utf-8")


def load_tree(stem: Path):
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    skel = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    return unflatten(skel, tensors)


def rng_state() -> dict:
    """This process's RNG states (torch CPU [+ CUDA], numpy global, python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(folder: str | Path, *, model_state: dict, optimizer_state: dict | list,
                    rng_states: list[dict], state: dict, config_text: str) -> None:
    """Write a complete checkpoint folder atomically (call on the main process only).

    ``optimizer_state`` is one state dict, or one per rank (DeepSpeed ZeRO partitions);
    ``rng_states`` has one entry per rank, in rank order.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_tree(optimizer_state, tmp / "optimizer")
        save_tree(rng_states, tmp / "rng")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        write_manifest(tmp, {"schema": SCHEMA, "world_size": len(rng_states),
                             "epoch": state.get("epoch"), "step": state.get("step")})


def load_checkpoint(folder: str | Path) -> dict:
    """Read a checkpoint folder -> dict(model, optimizer, rng, state, config_text, world_size)."""
    folder = Path(folder)
    manifest = read_manifest(folder, SCHEMA)
    return {
        "model": load_file(str(folder / "model.safetensors")),
        "optimizer": load_tree(folder / "optimizer"),
        "rng": load_tree(folder / "rng"),
        "state": json.loads((folder / "state.json").read_text(encoding="utf-8")),
        "config_text": (folder / "config.yaml").read_text(encoding="utf-8"),
        "world_size": int(manifest.get("world_size", 1)),
    }
