"""``bench train --compare REF``: the training epoch and evaluation of git revision REF and of this
working tree, measured side by side on a shared, noisy machine.

REF is exported with ``git archive`` into a temporary folder (the exact committed code, nothing of
this tree). Each measurement is one subprocess ``python -m dllm2rec bench train --repeats 1`` run
from the tree under test (so it imports that tree's package): one epoch through the real trainer and
one full evaluation. Old and new alternate (old-new, new-old, ...) so that both see the same
background load; the result is the median of each and the ratio old / new of the medians, with
the load average before every measurement.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def repo_root() -> Path:
    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: --compare needs a git checkout ({here}: {out.stderr.strip()})")
    return Path(out.stdout.strip())


def export_revision(root: Path, ref: str, dest: Path) -> str:
    """Extract ``ref`` of the repository at ``root`` into ``dest``; returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode:
        raise SystemExit(f"error: --compare {ref!r}: not a commit of {root} ({commit.stderr.strip()})")
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(root), "archive", commit.stdout.strip()], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise SystemExit(f"error: git archive {ref} failed")
    return commit.stdout.strip()


def measure_tree(tree: Path, args, out: Path) -> dict:
    """One ``bench train --repeats 1`` in a subprocess importing the package of ``tree``."""
    cmd = [sys.executable, "-m", "dllm2rec", "bench", "train", "--rows", str(args.rows), "--items", str(args.items),
           "--emb-dim", str(args.emb_dim), "--top-n", str(args.top_n), "--repeats", "1",
           "--threads", str(args.threads), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.with_suffix(".json").read_text())


def compare_revisions(args) -> tuple[str, dict]:
    root = repo_root()
    runs: dict[str, dict[str, list[float]]] = {"old": {"epoch": [], "eval": []}, "new": {"epoch": [], "eval": []}}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_revision(root, args.compare, Path(tmp) / "old")
        trees = {"old": Path(tmp) / "old", "new": root}
        for i in range(args.repeats):
            for tag in (("old", "new") if i % 2 == 0 else ("new", "old")):
                loads.append(round(os.getloadavg()[0], 2))
                r = measure_tree(trees[tag], args, Path(tmp) / f"{tag}{i}.md")
                runs[tag]["epoch"].append(r["epoch_median"])
                runs[tag]["eval"].append(r["eval_median"])
    med = {tag: {k: statistics.median(v) for k, v in d.items()} for tag, d in runs.items()}
    result = {"ref": args.compare, "commit": commit, "threads": args.threads, "runs": runs, "medians": med,
              "ratio_old_over_new": {k: med["old"][k] / med["new"][k] for k in ("epoch", "eval")},
              "load_averages": loads}
    lines = [f"## bench train --compare {args.compare}", "",
             f"Command: `python -m dllm2rec {' '.join(sys.argv[1:])}`  ",
             f"old = {args.compare} ({commit[:12]}), new = this working tree; {args.repeats} alternating pairs, "
             f"threads {args.threads or 'default'}; 1-minute load average before each run: "
             f"{', '.join(str(x) for x in loads)}", "",
             "| measurement | old median (s) | new median (s) | old / new | old runs (s) | new runs (s) |",
             "|---|---|---|---|---|---|"]
    for k, name in (("epoch", "training epoch"), ("eval", "full evaluation")):
        lines.append(f"| {name} | {med['old'][k]:.2f} | {med['new'][k]:.2f} | {result['ratio_old_over_new'][k]:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in runs['old'][k])} | {', '.join(f'{x:.2f}' for x in runs['new'][k])} |")
    return "\n".join(lines) + "\n", result
