"""Export a trained student as a self-contained artefact, and load it back without pickle.

``python -m dllm2rec export --checkpoint runs/x --out exported/x``

Artefact folder (schema ``dllm2rec.export/2``; ``manifest.json`` written last):

| file | content |
|---|---|
| ``weights.safetensors`` | the student's weights (``state_dict`` names) and, for ED students, ``ed_table`` Float[N+1, H]: the teacher table projected once (row N zeros), so the wide LLM table is not needed |
| ``items.jsonl`` | one ``{"id": i, "title": ...}`` per item, ids 0..N-1 in order |
| ``config.yaml`` | the training run's resolved config (for people; the loader reads the manifest) |
| ``manifest.json`` | schema, ``format`` ("safetensors"), ``architecture`` (``model`` = the run's ``ModelConfig``, ``n_items``, ``llm_dim``, ``ed_weight``, ``learnable_offset``), n_items, padding_id, max_len, hidden, model, ed, metrics (the run's results.json), config, id_map_hash, sha256 of every file, torch version |

``load_exported(folder) -> ExportedStudent`` checks every file's sha256 against the manifest, reads
the weights with ``safetensors`` (a format whose loader cannot execute code) and rebuilds the
module in code with ``dllm2rec.models.build_student``; it imports no training, data, evaluation,
FAISS or Accelerate code. ``topk(histories, k, exclude_seen)`` gives the same ids as
``dllm2rec.serve.recommend.recommend`` / ``metrics.topk_items`` on the run folder.

Schema ``dllm2rec.export/1`` (a ``torch.export`` program, which ``torch.export.load`` may unpickle)
is refused with a message to re-export; no compiled graph is offered any more.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from dllm2rec.errors import DataError, ManifestError
from dllm2rec.serve.student import Student

SCHEMA = "dllm2rec.export/2"
OLD_SCHEMAS = ("dllm2rec.export/1",)
FILES = ("weights.safetensors", "items.jsonl", "config.yaml")
ED_TABLE = "ed_table"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ExportedStudent(Student):
    """A loaded artefact: a ``serve.student.Student`` (so ``recommend()`` accepts it) plus its manifest."""

    manifest: dict = field(default_factory=dict)

    @torch.no_grad()
    def topk(self, histories: list[list[int]], k: int, exclude_seen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain-torch top-k: histories are id lists, oldest first (the most recent max_len are
        used). Returns (scores Float[R, k], ids Long[R, k]) best first; -1 marks empty slots."""
        n, pad = self.n_items, self.padding_id
        if any(not h for h in histories):
            raise ValueError("every history needs at least one item")
        if any(i < 0 or i >= n for h in histories for i in h):
            raise ValueError(f"history ids must lie in 0..{n - 1}")
        hist = torch.full((len(histories), self.max_len), pad, dtype=torch.long)
        lengths = torch.tensor([min(len(h), self.max_len) for h in histories], dtype=torch.long)
        for r, h in enumerate(histories):
            recent = h[-self.max_len:]
            hist[r, : len(recent)] = torch.tensor(recent, dtype=torch.long)
        scores = torch.addmm(self.output_bias, self.encode(hist, lengths), self.output_weight.T)
        if exclude_seen:
            rows = torch.cat([torch.full((len(h),), r, dtype=torch.long) for r, h in enumerate(histories)])
            cols = torch.cat([torch.tensor(h, dtype=torch.long) for h in histories])
            scores[rows, cols] = float("-inf")
        s, i = torch.topk(scores, min(k, n), dim=1)
        i = i.masked_fill(torch.isneginf(s), -1)
        if k > n:
            s = torch.cat([s, torch.full((s.shape[0], k - n), float("-inf"))], 1)
            i = torch.cat([i, torch.full((i.shape[0], k - n), -1, dtype=torch.long)], 1)
        return s, i


def _read_manifest(folder: Path) -> dict:
    from dllm2rec.readers import read_json

    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ManifestError(f"{folder}: no manifest.json; not a complete dllm2rec export")
    manifest = read_json(mpath)
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema in OLD_SCHEMAS:
        raise ManifestError(f"{mpath}: {schema} holds a torch.export program, whose loader can unpickle (run) code; "
                            "it is no longer loaded. Re-export the run: python -m dllm2rec export --checkpoint RUN --out DIR")
    if schema != SCHEMA or manifest.get("complete") is not True:
        raise ManifestError(f"{mpath}: not a complete {SCHEMA} manifest")
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(FILES):
        raise ManifestError(f"{mpath}: 'sha256' must list exactly {list(FILES)}")
    return manifest


def _titles(path: Path) -> list[str]:
    titles = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            try:
                row = json.loads(line)
                ok = row["id"] == i and isinstance(row["title"], str)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(path, f"not an {{id, title}} JSON object ({exc})", row=i + 1) from exc
            if not ok:
                raise DataError(path, f"expected id {i} with a string title", row=i + 1)
            titles.append(row["title"])
    return titles


def load_exported(folder: str | Path) -> ExportedStudent:
    """Load an export folder (see module docstring). Refuses incomplete, altered or old-format folders
    (``ManifestError``) and corrupt files (``DataError``); never unpickles."""
    from dllm2rec.config import ModelConfig
    from dllm2rec.models import build_student
    from dllm2rec.readers import read_safetensors

    folder = Path(folder)
    manifest = _read_manifest(folder)
    for name, digest in manifest["sha256"].items():
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            raise ManifestError(f"{folder / name}: missing or sha256 differs from the manifest; the artefact was altered")
    weights = read_safetensors(folder / "weights.safetensors")
    ed_table = weights.pop(ED_TABLE, None)
    titles = _titles(folder / "items.jsonl")
    arch = manifest.get("architecture") or {}
    try:
        known = {f.name for f in fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in arch["model"].items() if k in known})
        model = build_student(model_cfg, int(arch["n_items"]), llm_dim=arch["llm_dim"], ed_weight=arch["ed_weight"],
                              learnable_offset=arch["learnable_offset"])
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ManifestError(f"{folder}: architecture in the manifest does not match weights.safetensors ({exc})") from exc
    if len(titles) != manifest["n_items"] or model.output.weight.shape[0] != len(titles):
        raise ManifestError(f"{folder}: items.jsonl, weights.safetensors and the manifest disagree on the item count")
    if (ed_table is None) != (arch["llm_dim"] is None):
        raise ManifestError(f"{folder}: an ED student needs '{ED_TABLE}' in weights.safetensors (and only an ED student)")
    return ExportedStudent(model=model.eval(), titles=titles, max_len=int(manifest["max_len"]), ed_table=ed_table,
                           config=None, run_dir=None, manifest=manifest)


def export_student(student, out: str | Path) -> dict:
    """Write the artefact for a loaded ``serve.student.Student`` atomically; return the manifest."""
    from safetensors.torch import save_file

    from dllm2rec.atomic import atomic_dir, write_manifest
    from dllm2rec.config import config_to_dict, dump_config
    from dllm2rec.data.dataset import id_map_hash
    from dllm2rec.readers import read_json

    cfg = student.config
    n, pad, L = student.n_items, student.padding_id, student.max_len
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.model.state_dict().items()}
    if student.ed_table is not None:
        tensors[ED_TABLE] = student.ed_table.detach().cpu().contiguous().clone()
    llm_proj = tensors.get("embed.llm_proj.weight")
    results = {}
    if student.run_dir is not None and (student.run_dir / "results.json").is_file():
        results = read_json(student.run_dir / "results.json")
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "weights.safetensors"), metadata={"format": "pt", "schema": SCHEMA})
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as fh:
            for i, t in enumerate(student.titles):
                fh.write(json.dumps({"id": i, "title": t}, ensure_ascii=False) + "\n")
        dump_config(cfg, tmp / "config.yaml")
        manifest = {
            "schema": SCHEMA, "format": "safetensors", "torch": torch.__version__,
            "architecture": {"model": config_to_dict(cfg.model), "n_items": n,
                             "llm_dim": None if llm_proj is None else int(llm_proj.shape[1]),
                             "ed_weight": cfg.distill.ed.weight, "learnable_offset": cfg.distill.ed.learnable_offset},
            "n_items": n, "padding_id": pad, "max_len": L, "model": cfg.model.name,
            "hidden": int(student.output_weight.shape[1]),
            "ed": {"enabled": student.ed_table is not None, "weight": cfg.distill.ed.weight,
                   "learnable_offset": cfg.distill.ed.learnable_offset},
            "metrics": results, "config": config_to_dict(cfg), "id_map_hash": id_map_hash(student.titles),
            "source_run": str(student.run_dir) if student.run_dir else None,
            "sha256": {name: _sha256(tmp / name) for name in FILES},
        }
        write_manifest(tmp, manifest)
    return {**manifest, "complete": True}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="student run folder (config.yaml, best/model.safetensors)")
    parser.add_argument("--out", required=True, help="artefact folder to write (replaced atomically)")
    parser.add_argument("--dataset", default=None, help="dataset folder (default: the one in config.yaml)")
    parser.add_argument("--teacher", default=None, help="teacher folder for ED students (default: config.yaml)")


def run(args: argparse.Namespace) -> int:
    import sys

    from dllm2rec.serve.student import load_student

    student = load_student(args.checkpoint, args.dataset, args.teacher)
    manifest = export_student(student, args.out)
    total = sum((Path(args.out) / f).stat().st_size for f in FILES)
    print(f"exported {manifest['model']} ({manifest['n_items']} items, ED {'on' if manifest['ed']['enabled'] else 'off'}) "
          f"to {args.out} ({total / 1e6:.2f} MB)", file=sys.stderr)
    return 0
