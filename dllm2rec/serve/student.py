"""A trained student run folder, loaded for scoring: ``load_student(run_dir) -> Student``.

Shared by ``recommend``, ``export``, the studies and the benchmarks (it sits below all of them).
ED students get their teacher table projected once at load time (``Student.ed_table``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dllm2rec.errors import ManifestError

WEIGHTS = "best/model.safetensors"


@dataclass
class Student:
    """A trained student ready to score histories.

    model: eval-mode ``nn.Module`` (the ARCHITECTURE model contract). ed_table: Float[N+1, H] or
    None (no ED). max_len: history length the model was trained with. padding_id = n_items.
    """

    model: nn.Module
    titles: list[str]
    max_len: int
    ed_table: torch.Tensor | None
    config: object = None  # the run's RunConfig
    run_dir: Path | None = None

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @property
    def padding_id(self) -> int:
        return len(self.titles)

    @property
    def output_weight(self) -> torch.Tensor:
        """Float[N, H_out]: scores = h @ output_weight.T + output_bias."""
        return self.model.output.weight.detach()

    @property
    def output_bias(self) -> torch.Tensor:
        return self.model.output.bias.detach()

    @torch.no_grad()
    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """history Long[B, max_len] (right-padded with N), lengths Long[B] -> Float[B, H]."""
        kw = {}
        if self.ed_table is not None:
            kw["llm_hist_projected"] = self.ed_table[history]
        return self.model.encode(history, lengths, None, **kw)


def _resolve(path: str, run_dir: Path, what: str, flag: str) -> Path:
    """A path stored in config.yaml is relative to where training ran; also try the run folder."""
    p = Path(path)
    for cand in (p, run_dir / p) if not p.is_absolute() else (p,):
        if cand.exists():
            return cand
    raise ManifestError(f"{run_dir}/config.yaml: {what} {path!r} not found; pass {flag} <folder>")


def load_student(run_dir: str | Path, dataset: str | Path | None = None, teacher: str | Path | None = None,
                 weights: str = WEIGHTS) -> Student:
    """Load ``run_dir`` (config.yaml + best/model.safetensors) with its dataset's item table.

    ``dataset`` / ``teacher`` override the folders recorded in config.yaml (e.g. after a move).
    """
    from dllm2rec.config import load_config
    from dllm2rec.data.dataset import load_dataset
    from dllm2rec.models import build_student, project_llm_table
    from dllm2rec.readers import read_safetensors

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ManifestError(f"{run_dir}: no config.yaml; not a student run folder")
    cfg = load_config(run_dir / "config.yaml")
    wfile = run_dir / weights
    if not wfile.is_file():
        raise ManifestError(f"{wfile}: not found (did the run finish an epoch?)")
    state = read_safetensors(wfile)
    ds = load_dataset(_resolve(str(dataset or cfg.data.path), run_dir, "dataset", "--dataset"))
    if "output.weight" not in state:
        raise ManifestError(f"{wfile}: no 'output.weight' tensor; not a student checkpoint")
    if state["output.weight"].shape[0] != ds.n_items:
        raise ManifestError(f"{wfile}: model scores {state['output.weight'].shape[0]} items but the "
                            f"dataset {ds.path} has {ds.n_items}: wrong dataset for this run")
    ed = cfg.distill.ed
    llm_dim = state["embed.llm_proj.weight"].shape[1] if "embed.llm_proj.weight" in state else None
    model = build_student(cfg.model, ds.n_items, llm_dim=llm_dim, ed_weight=ed.weight,
                          learnable_offset=ed.learnable_offset)
    model.load_state_dict(state)
    model.eval()
    ed_table = None
    if llm_dim is not None:
        from dllm2rec.data.knowledge import load_teacher

        # serving needs only the item embeddings: a teacher over a subset of rows is fine here
        tk = load_teacher(_resolve(str(teacher or cfg.distill.teacher), run_dir, "teacher", "--teacher"), ds,
                          min_coverage=0.0)
        if tk.emb_dim != llm_dim:
            raise ManifestError(f"{tk.path}: teacher embeddings are {tk.emb_dim} wide but the student {wfile} "
                                f"was trained with {llm_dim}-wide ones: wrong teacher for this run")
        proj = project_llm_table(model, tk.embeddings.to(torch.float32))
        ed_table = torch.cat([proj, torch.zeros(1, proj.shape[1], dtype=proj.dtype)]).contiguous()
    return Student(model=model, titles=list(ds.titles), max_len=cfg.model.max_len, ed_table=ed_table,
                   config=cfg, run_dir=run_dir)
