"""Small PNG plots for studies and diagnostics (matplotlib, Agg backend, written atomically).

Every function takes plain Python data (no run folders), writes one PNG of about 10-60 KB
(figure ~7 x 4 in at 100 dpi) with a title and labelled axes, and returns the path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, never need a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    from dllm2rec.atomic import atomic_path

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    _plt().close(fig)
    return path


def study_bars(rows: list[dict], k: int, teacher: dict | None, path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per student, one bar per variant (mean, std error bars), two panels
    (HR@k, NDCG@k); the teacher's metric as a dashed line when known."""
    plt = _plt()
    students = list(dict.fromkeys(r["student"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.2 + 0.45 * len(students) * len(variants)), 4.0))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(students))
    for ax, metric in zip(axes, ("hr", "ndcg")):
        key = f"{metric}@{k}"
        for j, v in enumerate(variants):
            means, stds = [], []
            for s in students:
                r = next((r for r in rows if r["student"] == s and r["variant"] == v), None)
                means.append(np.nan if r is None or r[f"{key}_mean"] is None else r[f"{key}_mean"])
                stds.append(0.0 if r is None or r[f"{key}_std"] is None else r[f"{key}_std"])
            ax.bar(x - 0.4 + width * (j + 0.5), means, width, yerr=stds, capsize=2, label=v)
        if teacher and key in teacher:
            ax.axhline(teacher[key], color="black", linestyle="--", linewidth=1, label="teacher")
        ax.set_xticks(x, students)
        ax.set_xlabel("student")
        ax.set_ylabel(f"test {key.upper()}")
        ax.set_title(f"{key.upper()}")
    axes[1].legend(fontsize=7, ncol=1 + len(variants) // 6)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def overlap_bars(shares: dict[str, dict[str, float]], k: int, path: str | Path, title: str = "") -> Path:
    """Stacked bars per student run: share of top-k slots that are teacher-only / both / student-only.

    ``shares`` = {run label: {"teacher_only": ., "overlap": ., "student_only": .}} (shares of k)."""
    plt = _plt()
    labels = list(shares)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 1.4 * len(labels)), 4.0))
    bottom = np.zeros(len(labels))
    for part, color in (("overlap", "tab:purple"), ("student_only", "tab:blue")):
        vals = np.array([shares[lab][part] for lab in labels])
        ax.bar(labels, vals, 0.6, bottom=bottom, label=part.replace("_", " "), color=color)
        for i, v in enumerate(vals):
            if v > 0.03:
                ax.text(i, bottom[i] + v / 2, f"{100 * v:.1f}%", ha="center", va="center", fontsize=8, color="white")
        bottom += vals
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of the student's top-{k} list")
    ax.set_xlabel("student run")
    ax.set_title(title or f"Student top-{k}: shared with the teacher's top-{k}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def part_hit_bars(hits: dict[str, dict[str, float]], k: int, path: str | Path, title: str = "") -> Path:
    """Grouped bars: per run, the hit rate (share of rows whose target lies in the part) of the
    teacher-only, overlap and student-only parts of the two top-k lists."""
    plt = _plt()
    labels = list(hits)
    parts = ("teacher_only", "overlap", "student_only")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 1.6 * len(labels)), 4.0))
    x = np.arange(len(labels))
    width = 0.8 / len(parts)
    for j, part in enumerate(parts):
        ax.bar(x - 0.4 + width * (j + 0.5), [hits[lab][part] for lab in labels], width, label=part.replace("_", " "))
    ax.set_xticks(x, labels)
    ax.set_xlabel("student run")
    ax.set_ylabel("hit rate (share of rows with the target in the part)")
    ax.set_title(title or f"Hit rate by part of the two top-{k} lists", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def histogram(values: np.ndarray, path: str | Path, xlabel: str, title: str, bins: int = 50,
              by_position: np.ndarray | None = None) -> Path:
    """Histogram of ``values`` (log-scaled counts); with ``by_position`` (Float[K]) a second panel
    shows the mean per candidate position."""
    plt = _plt()
    panels = 2 if by_position is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels + 1, 4.0), squeeze=False)
    ax = axes[0, 0]
    ax.hist(np.asarray(values, dtype=np.float64).ravel(), bins=bins, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count (log scale)")
    ax.set_title(title, fontsize=10)
    if by_position is not None:
        ax2 = axes[0, 1]
        pos = np.arange(1, len(by_position) + 1)
        ax2.bar(pos, by_position, color="tab:orange")
        ax2.set_xlabel("teacher candidate position k")
        ax2.set_ylabel(f"mean {xlabel}")
        ax2.set_title("mean weight per position", fontsize=10)
    return _save(fig, path)


def curves(series: dict[str, tuple[list[int], list[float]]], path: str | Path, ylabel: str, title: str) -> Path:
    """One line per run: ``{label: (epochs, values)}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def is_png(path: str | Path) -> bool:
    """True when ``path`` starts with the PNG signature and has an IHDR chunk."""
    head = Path(path).read_bytes()[:16]
    return head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
