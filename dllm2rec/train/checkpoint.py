"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

``checkpoints/last/`` (replaced atomically as a whole folder, manifest last) holds

| file | content |
|---|---|
| `model.safetensors` | student weights (unwrapped) |
| `optimizer.safetensors` + `optimizer.json` | optimizer state: tensors + the JSON skeleton that places them |
| `rng.safetensors` + `rng.json` | torch / numpy / python RNG states of EVERY rank |
| `state.json` | data position (epoch, step), global step, early-stopping state, epoch loss sums |
| `config.yaml` | the resolved run config |
| `manifest.json` | schema, world size, position, ``inputs`` (hashes of the dataset and teacher), written last |

``check_resume`` refuses to continue a checkpoint under a different resolved config or different
inputs (dataset id-map hash, content digests of the dataset and teacher folders): the error lists every
differing key. ``RESUME_ALLOWED`` are the few keys that ``--allow-change`` may let through (they
change how long / how often, not what is trained).

Nested Python state is flattened by ``flatten``: tensors (and numpy arrays) go to a flat
``{name: tensor}`` dict, the rest is JSON with ``{"__tensor__": name}`` placeholders; dicts keep
their key types (optimizer state is keyed by int) and tuples stay tuples. Loading never
unpickles: ``safetensors`` + ``json`` only (``torch.load`` is not used at all here).
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from dllm2rec.atomic import atomic_dir, read_manifest, write_manifest
from dllm2rec.config import RunConfig, config_diff, config_to_dict, flat_items, yaml_load
from dllm2rec.errors import ConfigError, ManifestError
from dllm2rec.readers import read_json, read_safetensors, read_text

SCHEMA = "dllm2rec.checkpoint/2"
# /1 recorded no input hashes: a resume from it could not prove it continues the same run.
OLD_SCHEMAS = ("dllm2rec.checkpoint/1",)
# Never compared: where the run folder lives and whether a progress bar is drawn.
RESUME_IGNORED = frozenset({("train", "output_dir"), ("train", "progress")})
# May differ on resume only when named by --allow-change: they set how long training runs and how
# often it checkpoints, not what a step computes, so the continued run is still the same run.
RESUME_ALLOWED = ("train.epochs", "train.patience", "train.checkpoint_every", "train.checkpoint_every_steps")

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
    tensors = read_safetensors(stem.with_suffix(".safetensors"))
    return unflatten(read_json(stem.with_suffix(".json")), tensors)


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
                    rng_states: list[dict], state: dict, config_text: str, inputs: dict | None = None) -> None:
    """Write a complete checkpoint folder atomically (call on the main process only).

    ``optimizer_state`` is one state dict, or one per rank (DeepSpeed ZeRO partitions);
    ``rng_states`` has one entry per rank, in rank order; ``inputs`` is ``input_digests(...)``.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_tree(optimizer_state, tmp / "optimizer")
        save_tree(rng_states, tmp / "rng")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        write_manifest(tmp, {"schema": SCHEMA, "world_size": len(rng_states), "inputs": inputs or {},
                             "epoch": state.get("epoch"), "step": state.get("step")})


def load_checkpoint(folder: str | Path) -> dict:
    """Read a checkpoint folder -> dict(model, optimizer, rng, state, config_text, world_size, inputs)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("schema") in OLD_SCHEMAS:
        raise ManifestError(f"{folder}: checkpoint schema {manifest['schema']!r} records no input hashes, so a "
                            f"resume cannot be checked against the run it came from; delete {folder} to start over")
    if manifest.get("schema") != SCHEMA:
        raise ManifestError(f"{folder / 'manifest.json'}: schema is {manifest.get('schema')!r}, expected {SCHEMA!r}")
    return {
        "model": read_safetensors(folder / "model.safetensors"),
        "optimizer": load_tree(folder / "optimizer"),
        "rng": load_tree(folder / "rng"),
        "state": read_json(folder / "state.json"),
        "config_text": read_text(folder / "config.yaml"),
        "world_size": int(manifest.get("world_size", 1)),
        "inputs": manifest.get("inputs") or {},
    }


def _file_sha256(path: Path, h=None):
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() if own else h


def folder_digest(folder: str | Path) -> str:
    """sha256 over the name and bytes of every top-level file of ``folder`` (manifest, rank files,
    embeddings; sub-folders such as a teacher's ``work/`` are not part of the artefact).

    Content, not the manifest alone: two teacher runs can write identical manifests. Reading the
    files costs about 1.5 s per GB (0.28 s for 200 MB measured on the 2-core dev box, page-cached),
    once per training start."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")):
        h.update(p.name.encode() + b"\0")
        _file_sha256(p, h)
    return h.hexdigest()


def input_digests(dataset, teacher) -> dict:
    """What a checkpoint was trained on: the dataset's id-map hash and ``folder_digest`` of the
    dataset and teacher folders (teacher None when the run uses no teacher)."""
    return {"dataset_id_map_hash": dataset.manifest.get("id_map_hash"),
            "dataset_sha256": folder_digest(dataset.path),
            "teacher_sha256": None if teacher is None else folder_digest(teacher.path)}


def check_allowed(allow: tuple[str, ...]) -> None:
    """``--allow-change`` may name only ``RESUME_ALLOWED`` keys (checked before anything loads)."""
    bad = sorted(set(allow) - set(RESUME_ALLOWED))
    if bad:
        raise ConfigError(f"--allow-change {', '.join(bad)}: only {', '.join(RESUME_ALLOWED)} may change on resume")


def check_resume(folder: str | Path, saved: dict, config: dict, inputs: dict, allow: tuple[str, ...] = ()) -> None:
    """Refuse to resume ``saved`` (``load_checkpoint``) under another resolved ``config`` (a
    ``config_to_dict``) or other ``inputs`` (``input_digests``). ``allow``: keys of ``RESUME_ALLOWED``
    that may differ. ``ConfigError`` lists every refused key with its saved and new value."""
    check_allowed(allow)
    try:
        old = yaml_load(saved["config_text"]) or {}
    except yaml.YAMLError as exc:
        old = exc
    if not isinstance(old, dict):
        raise ManifestError(f"{Path(folder) / 'config.yaml'}: truncated or corrupt, not a YAML mapping ({old})")
    flat_old, flat_new = _flat(old), _flat(config)
    defaults = config_to_dict(RunConfig())  # keys added since the checkpoint was written keep their default
    refused = [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
               for k in config_diff(old, config, RESUME_IGNORED, defaults) if k not in allow]
    was = saved.get("inputs") or {}
    refused += [f"inputs.{k}: {was.get(k)!r} -> {inputs.get(k)!r}" for k in sorted(set(was) | set(inputs))
                if was.get(k) != inputs.get(k)]
    if refused:
        raise ConfigError(
            f"{folder}: cannot resume, the checkpoint belongs to a different run; differing keys: {'; '.join(refused)}. "
            f"Train into a new train.output_dir or delete {folder} to start over"
            f" ({', '.join(RESUME_ALLOWED)} may change with --allow-change KEY)")


def _flat(d: dict) -> dict:
    return {".".join(k): v for k, v in flat_items(d).items()}
