"""Where the time of one training step goes (``bench train --profile STEPS``).

Runs ``steps`` training steps of the bench configuration through the trainer's own parts
(``load_inputs``, ``StepObjective``, ``Encoder``, ``make_optimizer``, ``make_batch``) in one process,
without distribution, and times each part with ``time.perf_counter`` (CPU ops are synchronous):

- ``batch``: assembling the batch (split rows + teacher candidates);
- ``forward: ED gather/projection``: the student's input embedding (id embedding + the ED
  projection of the batch's distinct teacher rows), via forward hooks on ``student.embed``;
- ``forward: encoder (rest)``: the rest of ``encode`` (SASRec blocks);
- ``forward: DRO catalogue pass`` / ``forward: RD`` / ``forward: base loss + other``: the
  objective's sections (``StepObjective.timer``);
- ``backward: DRO catalogue pass`` / ``backward: ED gather/projection``: the backward of the two
  custom autograd Functions, via pre/post hooks on their graph nodes; ``backward: rest`` = the
  remainder of ``loss.backward()``;
- ``optimizer``: ``zero_grad`` + ``step``.
Returns per-part medians over the measured steps (after ``warmup`` unmeasured steps).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

CUSTOM_NODES = {"_CatalogueLSEBackward": "backward: DRO catalogue pass",
                "_GatherProjectBackward": "backward: ED gather/projection"}


def _graph_nodes(root):
    """Every autograd node reachable from ``root`` (iterative, each once)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions)


def _hook_backward(loss, acc: dict) -> None:
    for node in _graph_nodes(loss.grad_fn):
        label = CUSTOM_NODES.get(node.name())
        if label is None:
            continue
        start = {}
        node.register_prehook(lambda g, start=start: start.__setitem__("t", time.perf_counter()) or None)
        node.register_hook(lambda gi, go, start=start, label=label:
                           acc.__setitem__(label, acc[label] + time.perf_counter() - start["t"]) or None)


def profile_steps(cfg, steps: int, warmup: int = 2) -> dict:
    """Median seconds per part of a training step -> ``{"parts": {name: s}, "step": s, "steps": n}``."""
    import torch

    from dllm2rec.train.batches import epoch_order, global_batch, make_batch, step_seed
    from dllm2rec.train.inputs import load_inputs
    from dllm2rec.train.loop import make_optimizer
    from dllm2rec.train.objective import Encoder, StepObjective

    inputs = load_inputs(cfg)
    student, train = inputs.student, inputs.splits["train"]
    objective = StepObjective(cfg, inputs.dataset.n_items, train.target, inputs.teacher)
    encoder = Encoder(student, objective.mm_dtype)
    optimizer = make_optimizer(encoder, cfg)
    order = epoch_order(cfg.train.seed, 0, len(train))
    n_steps = min(steps + warmup, -(-len(train) // cfg.train.batch_size))
    acc: dict[str, float] = defaultdict(float)

    @contextmanager
    def timer(name):
        t = time.perf_counter()
        yield
        acc[name] += time.perf_counter() - t

    embed_start = {}
    student.embed.register_forward_pre_hook(lambda m, a: embed_start.__setitem__("t", time.perf_counter()) or None)
    student.embed.register_forward_hook(
        lambda m, a, o: acc.__setitem__("forward: ED gather/projection",
                                        acc["forward: ED gather/projection"] + time.perf_counter() - embed_start["t"]) or None)
    objective.timer = timer
    samples: dict[str, list[float]] = defaultdict(list)
    totals = []
    encoder.train()
    for step in range(n_steps):
        acc.clear()
        t0 = time.perf_counter()
        seed = step_seed(cfg.train.seed, 0, step, 0)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        with timer("batch"):
            batch = make_batch(train, global_batch(order, step, cfg.train.batch_size), inputs.teacher, objective.rd_k)
        t1 = time.perf_counter()
        terms = objective(encoder, student, batch, gen)
        loss = sum(terms.values())
        forward = time.perf_counter() - t1
        _hook_backward(loss, acc)
        with timer("backward"):
            loss.backward()
        with timer("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # the trainer zeroes before backward; same work
        total = time.perf_counter() - t0
        if step < warmup:
            continue
        named = sum(acc[k] for k in acc if k.startswith("forward: ") and k != "forward: encoder")
        parts = {k: v for k, v in acc.items() if k.startswith("forward: ") and k != "forward: encoder"}
        parts["forward: encoder (rest)"] = acc["forward: encoder"] - acc["forward: ED gather/projection"]
        parts["forward: base loss + other"] = forward - named - parts["forward: encoder (rest)"]
        custom = sum(acc[v] for v in CUSTOM_NODES.values())
        parts.update({v: acc[v] for v in CUSTOM_NODES.values()})
        parts["backward: rest"] = acc["backward"] - custom
        parts["batch"], parts["optimizer"] = acc["batch"], acc["optimizer"]
        for k, v in parts.items():
            samples[k].append(v)
        totals.append(total)
    return {"parts": {k: statistics.median(v) for k, v in samples.items()}, "step": statistics.median(totals),
            "steps": len(totals)}


def profile_markdown(p: dict) -> list[str]:
    order = ["batch", "forward: ED gather/projection", "forward: encoder (rest)", "forward: DRO catalogue pass",
             "forward: RD", "forward: base loss + other", "backward: DRO catalogue pass",
             "backward: ED gather/projection", "backward: rest", "optimizer"]
    lines = [f"Per-step profile (median of {p['steps']} steps, ms; parts are medians, so they need not add up "
             f"exactly to the step):", "", "| part | ms | share of step |", "|---|---|---|"]
    for k in order + sorted(set(p["parts"]) - set(order)):
        if k in p["parts"]:
            v = p["parts"][k]
            lines.append(f"| {k} | {v * 1e3:.1f} | {v / p['step']:.0%} |")
    lines.append(f"| **whole step** | **{p['step'] * 1e3:.1f}** | 100% |")
    return lines
