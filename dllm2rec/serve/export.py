"""Export a trained student as a self-contained artefact, and load it back with plain torch.

``python -m dllm2rec export --checkpoint runs/x --out exported/x``

Artefact folder (schema ``dllm2rec.export/1``; ``manifest.json`` written last):

| file | content |
|---|---|
| ``encoder.pt2`` | ``torch.export`` program: ``(history Long[B, L], lengths Long[B]) -> h Float[B, H]``, batch size dynamic, L = ``max_len``; ED students have the projected teacher table Float[N+1, H] baked in as a buffer (the wide LLM table is not needed) |
| ``output.pt`` | ``{"weight": Float[N, H], "bias": Float[N]}`` (``torch.save``; read with ``weights_only=True``): scores = h @ weight.T + bias |
| ``items.jsonl`` | one ``{"id": i, "title": ...}`` per item, ids 0..N-1 in order |
| ``config.yaml`` | the training run's resolved config |
| ``manifest.json`` | schema, n_items, padding_id, max_len, hidden, model, ed, metrics (the run's results.json), config, id_map_hash, sha256 of every file, torch version |

``load_exported(folder) -> ExportedStudent`` needs only torch + the standard library (no
dllm2rec model code, no FAISS, no dataset): ``topk(histories, k, exclude_seen)`` gives the same
ids as ``dllm2rec.serve.recommend.recommend`` / ``metrics.topk_items`` on the run folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCHEMA = "dllm2rec.export/1"
FILES = ("encoder.pt2", "output.pt", "items.jsonl", "config.yaml")


def _sha256(path: Path) -> str:
    # Deliberately not dllm2rec.data.dataset.file_sha256: loading an export must import only torch
    # (tests/test_export.py checks that no other dllm2rec module is imported).
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ExportedStudent:
    """A loaded artefact; same attributes as ``serve.student.Student`` so ``recommend()`` accepts it."""

    encoder: torch.nn.Module
    output_weight: torch.Tensor
    output_bias: torch.Tensor
    titles: list[str]
    max_len: int
    manifest: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @property
    def padding_id(self) -> int:
        return len(self.titles)

    @torch.no_grad()
    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """history Long[B, max_len] right-padded with N, lengths Long[B] -> Float[B, H]."""
        return self.encoder(history, lengths)

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


def load_exported(folder: str | Path) -> ExportedStudent:
    """Load an export folder (see module docstring). Refuses incomplete or altered folders."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{folder}: no manifest.json; not a complete dllm2rec export")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if manifest.get("schema") != SCHEMA or manifest.get("complete") is not True:
        raise ValueError(f"{mpath}: not a complete {SCHEMA} manifest")
    for name, digest in manifest["sha256"].items():
        if _sha256(folder / name) != digest:
            raise ValueError(f"{folder / name}: sha256 differs from the manifest; the artefact was altered")
    encoder = torch.export.load(str(folder / "encoder.pt2")).module()
    out = torch.load(folder / "output.pt", map_location="cpu", weights_only=True)
    titles = []
    with open(folder / "items.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            row = json.loads(line)
            if row["id"] != i:
                raise ValueError(f"{folder / 'items.jsonl'}: line {i + 1} has id {row['id']}, expected {i}")
            titles.append(row["title"])
    if len(titles) != manifest["n_items"] or out["weight"].shape[0] != len(titles):
        raise ValueError(f"{folder}: items.jsonl, output.pt and the manifest disagree on the item count")
    return ExportedStudent(encoder, out["weight"], out["bias"], titles, int(manifest["max_len"]), manifest)


class _Encoder(torch.nn.Module):
    """The student's encoder with the projected ED table as a buffer (what gets exported)."""

    def __init__(self, model: torch.nn.Module, ed_table: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.has_ed = ed_table is not None
        if self.has_ed:
            self.register_buffer("ed_table", ed_table.clone())

    def forward(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.has_ed:
            return self.model.encode(history, lengths, None, llm_hist_projected=self.ed_table[history])
        return self.model.encode(history, lengths, None)


def export_student(student, out: str | Path) -> dict:
    """Write the artefact for a loaded ``serve.student.Student`` atomically; return the manifest."""
    from dllm2rec.atomic import atomic_dir, write_manifest
    from dllm2rec.config import config_to_dict, dump_config
    from dllm2rec.data.dataset import id_map_hash

    cfg = student.config
    enc = _Encoder(student.model, student.ed_table).eval()
    n, pad, L = student.n_items, student.padding_id, student.max_len
    example = (torch.tensor([[0] + [pad] * (L - 1), list(range(min(L, n))) + [pad] * max(0, L - n)]),
               torch.tensor([1, min(L, n)]))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        # nn.GRU re-assigns its _flat_weights during tracing; the exported program is still
        # correct (tests/test_export.py compares its top-k with the training code's).
        warnings.filterwarnings("ignore", message=".*_flat_weights.*were assigned during export")
        program = torch.export.export(enc, example, dynamic_shapes={"history": {0: batch}, "lengths": {0: batch}})
    results = {}
    if student.run_dir is not None and (student.run_dir / "results.json").is_file():
        results = json.loads((student.run_dir / "results.json").read_text(encoding="utf-8"))
    out = Path(out)
    with atomic_dir(out) as tmp:
        torch.export.save(program, str(tmp / "encoder.pt2"))
        torch.save({"weight": student.output_weight.clone().contiguous(), "bias": student.output_bias.clone().contiguous()},
                   tmp / "output.pt")
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as fh:
            for i, t in enumerate(student.titles):
                fh.write(json.dumps({"id": i, "title": t}, ensure_ascii=False) + "\n")
        dump_config(cfg, tmp / "config.yaml")
        manifest = {
            "schema": SCHEMA, "format": "torch.export", "torch": torch.__version__,
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
