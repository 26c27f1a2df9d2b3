"""Deterministic (rank, world) sharding of teacher work, with atomic part files + done markers.

Layout under ``<output_dir>/work``::

    <phase>/<split>/part-00003-of-00008.<ext>    the shard's output (written atomically)
    <phase>/<split>/part-00003-of-00008.done     JSON marker written AFTER the part file

A shard counts as finished only when its marker exists and records the same ``fingerprint``
(a hash of the config that determines the output); a rerun skips finished shards and redoes
the rest. Rows are split into ``world`` contiguous blocks of the split's row order
(``numpy.array_split``), so the same (rank, world) always gets the same rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dllm2rec.atomic import atomic_write_json
from dllm2rec.errors import Dllm2RecError

_PART = re.compile(r"^part-(\d{5})-of-(\d{5})\.done$")


class ShardError(Dllm2RecError, RuntimeError):
    """Shard bookkeeping is inconsistent (missing shards, mixed world sizes, duplicate rows)."""


def resolve_rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Explicit flags win, then SLURM_PROCID/SLURM_NTASKS, then RANK/WORLD_SIZE, else (0, 1)."""
    if rank is None or world is None:
        env = os.environ
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            env_rank, env_world = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        elif "RANK" in env and "WORLD_SIZE" in env:
            env_rank, env_world = env["RANK"], env["WORLD_SIZE"]
        else:
            env_rank, env_world = "0", "1"
        try:
            rank = int(env_rank) if rank is None else rank
            world = int(env_world) if world is None else world
        except ValueError as exc:
            raise ShardError(f"rank/world environment variables are not integers: {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise ShardError(f"invalid shard: rank {rank} of world {world} (need 0 <= rank < world)")
    return rank, world


def shard_slice(n: int, rank: int, world: int) -> slice:
    """Contiguous block of ``range(n)`` owned by ``rank`` (sizes differ by at most one)."""
    # identical to numpy.array_split boundaries: the first n % world blocks get one extra row.
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return slice(start, stop)


def fingerprint(*parts: object) -> str:
    """Stable short hash of JSON-serialisable config pieces."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Part:
    folder: Path
    rank: int
    world: int

    @property
    def stem(self) -> str:
        return f"part-{self.rank:05d}-of-{self.world:05d}"

    def path(self, ext: str) -> Path:
        return self.folder / f"{self.stem}.{ext}"

    @property
    def marker(self) -> Path:
        return self.folder / f"{self.stem}.done"


def part(work: str | Path, phase: str, split: str, rank: int, world: int) -> Part:
    return Part(Path(work) / phase / split, rank, world)


def is_done(p: Part, fp: str) -> bool:
    """True when the shard's marker exists and was written for the same fingerprint."""
    if not p.marker.is_file():
        return False
    try:
        info = json.loads(p.marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("fingerprint") == fp


def mark_done(p: Part, fp: str, **info: object) -> None:
    """Write the done marker; call it only after the part file is in place."""
    atomic_write_json(p.marker, {"fingerprint": fp, "rank": p.rank, "world": p.world, **info})


def finished_parts(work: str | Path, phase: str, split: str, fp: str) -> list[Part]:
    """All finished parts of one (phase, split) for the current fingerprint; checks completeness.

    Raises ``ShardError`` when finished parts come from different world sizes or a rank is missing.
    """
    folder = Path(work) / phase / split
    found: list[Part] = []
    for marker in sorted(folder.glob("part-*.done")) if folder.is_dir() else []:
        m = _PART.match(marker.name)
        if m:
            p = Part(folder, int(m.group(1)), int(m.group(2)))
            if is_done(p, fp):
                found.append(p)
    if not found:
        raise ShardError(f"{folder}: no finished shards for this config; run `teacher {phase}` first")
    worlds = sorted({p.world for p in found})
    if len(worlds) > 1:
        raise ShardError(f"{folder}: finished shards come from different world sizes {worlds}; remove the stale ones")
    world = worlds[0]
    missing = sorted(set(range(world)) - {p.rank for p in found})
    if missing:
        raise ShardError(f"{folder}: shards {missing} of world {world} are not finished; run them first")
    return sorted(found, key=lambda p: p.rank)


def pending(work: Path, phase: str, splits, rank: int, world: int, fp: str) -> tuple[list[str], dict]:
    """(splits whose shard ``rank``/``world`` of ``phase`` is not finished for ``fp``, stats skeleton)."""
    todo = [s for s in splits if not is_done(part(work, phase, s, rank, world), fp)]
    return todo, {"skipped": [s for s in splits if s not in todo], "done": []}
