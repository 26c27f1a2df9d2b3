"""Error types raised for bad input. Messages name the file, the row/line and the problem."""
from __future__ import annotations


class Dllm2RecError(Exception):
    """Base class: the CLI prints these as one clear line and exits with status 2."""


class ConfigError(Dllm2RecError, ValueError):
    """A run config has an unknown key, a wrong type or an out-of-range value."""


class DataError(Dllm2RecError, ValueError):
    """An input file is malformed. ``str()`` reads ``<file>: row <n>: <problem>``."""

    def __init__(self, file: object, problem: str, row: int | None = None):
        self.file = str(file)
        self.row = row
        self.problem = problem
        where = f"{self.file}: row {row}: " if row is not None else f"{self.file}: "
        super().__init__(where + problem)


class ManifestError(Dllm2RecError, ValueError):
    """An artefact folder lacks a complete manifest or does not match the dataset it is used with."""


class TrainingError(Dllm2RecError, RuntimeError):
    """Training cannot continue (non-finite loss, world-size mismatch, ...)."""
