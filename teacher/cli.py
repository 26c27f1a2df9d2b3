"""``python -m teacher <phase>``: BIGRec-style teacher inference, sharded and resumable.

Phases (each skips shards already finished for the same config):
  model fetch   download + convert SmolLM2 once, print the cached HF folder
  model convert offline: convert a SmolLM2 GGUF you already have (--gguf) into the cache
  model digest  sha256 over a model folder's tensors (same weights on two machines?)
  generate      prompts -> recommended titles (vLLM or transformers; greedy or beam); a no-op
                with query.kind=history_* (teacher/query.py: the query is the history items' mean)
  embed         base-model embeddings of item titles and generated texts (last token, raw)
  ground        exact L2 top-n items per row (FAISS), gt distance, teacher rank of the target
  merge         check shards and write the teacher folder (docs/ARCHITECTURE.md)
  run           generate -> embed -> ground (-> merge when world == 1)
  constrained   beam search over the catalogue-title trie: K distinct real items per row by
                log-probability (score kind logprob); --merge writes the teacher folder
  sweep-gamma   collaborative grounding (ground.collab): validation HR/NDCG per gamma
  export-tocf   reference-code tocf files from a teacher folder
  import        your own teacher's rankings file (+ item embeddings) -> teacher folder
  from-run      a trained student run folder -> teacher folder (top-n + logits, item table)
  bench         vLLM vs transformers, FAISS vs torch; markdown table
Shard selection: --rank/--world, else SLURM_PROCID/SLURM_NTASKS, else RANK/WORLD_SIZE, else 0/1.
"""
from __future__ import annotations

from teacher.config import split_limits

import argparse
import json
import subprocess
import sys
import time

from dllm2rec.errors import Dllm2RecError

PHASES = ("generate", "embed", "ground")


def _common(p: argparse.ArgumentParser, shards: bool = True) -> None:
    p.add_argument("--config", default=None, help="teacher YAML (launch/configs/teacher_*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generate.decoding=beam limit=64")
    if shards:
        p.add_argument("--rank", type=int, default=None, help="shard index (default: from SLURM/RANK env)")
        p.add_argument("--world", type=int, default=None, help="number of shards (default: from env)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", metavar="<phase>")
    m = sub.add_parser("model", help="model utilities: `model fetch|convert|digest`")
    m.add_argument("action", choices=["fetch", "convert", "digest"])
    m.add_argument("--cache", default=None, help="cache root (default $DLLM2REC_CACHE or ~/.cache/dllm2rec)")
    m.add_argument("--gguf", default=None, help="convert: the SmolLM2-135M-Instruct GGUF file (no download)")
    m.add_argument("--path", default="smollm2", help="digest: 'smollm2' or a local HF folder")
    for name in PHASES:
        _common(sub.add_parser(name, help=f"{name} phase for this shard"))
    _common(sub.add_parser("merge", help="merge finished shards into the teacher folder"), shards=False)
    r = sub.add_parser("run", help="generate -> embed -> ground (-> merge) for this shard")
    _common(r)
    r.add_argument("--phases", default="generate,embed,ground,merge", help="comma-separated subset")
    c = sub.add_parser("constrained", help="constrained beam-search ranking for this shard (transformers)")
    _common(c)
    c.add_argument("--merge", action="store_true", help="only merge finished shards into the teacher folder")
    s = sub.add_parser("sweep-gamma", help="collaborative grounding: HR/NDCG per gamma on validation (no writes)")
    _common(s, shards=False)
    s.add_argument("--gammas", default="0,0.5,1,2,4,8,16", help="comma-separated gamma values")
    s.add_argument("--split", default="valid", choices=["valid", "test", "train"])
    s.add_argument("--select", default="ndcg@20", help="metric that picks the best gamma")
    s.add_argument("--rows", default=":", help="start:stop positions of the split's embedded rows (held-out checks)")
    e = sub.add_parser("export-tocf", help="write reference tocf files from a teacher folder")
    e.add_argument("--teacher", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--top-n", type=int, default=None)
    i = sub.add_parser("import", help="bring your own teacher: rankings file -> teacher folder")
    i.add_argument("--rankings", required=True, help="Parquet or JSON lines: row_id, topk_ids, topk_scores[, gt_score][, target_rank]")
    i.add_argument("--score-kind", default=None, help="distance | similarity | logit | logprob (README)")
    i.add_argument("--dataset", required=True, help="the prepared dataset folder the row ids belong to")
    i.add_argument("--out", required=True)
    i.add_argument("--item-embeddings", default=None, help="[n_items, d] .safetensors or .npy")
    i.add_argument("--min-top-n", type=int, default=10, help="refuse lists shorter than this (>= distill.rd.k)")
    fr = sub.add_parser("from-run", help="a trained student run folder -> teacher folder")
    fr.add_argument("--run", required=True, action="append",
                    help="a run folder; repeat for an ensemble (mean of the runs' softmax, score kind logprob)")
    fr.add_argument("--out", required=True)
    fr.add_argument("--top-n", type=int, default=50)
    fr.add_argument("--dataset", default=None, help="override the dataset folder recorded in the run")
    b = sub.add_parser("bench", help="benchmark engines and grounding; markdown table")
    _common(b, shards=False)
    b.add_argument("--rows", type=int, default=64, help="prompts per measurement")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--out", default="runs/bench/teacher_bench.md")
    b.add_argument("--only", default="", help="comma list of: vllm_greedy,hf_greedy,vllm_beam,hf_beam,hf_constrained,vllm_embed,hf_embed,sentence_embed,ground")

    _add_finetune_parsers(sub)
    _add_compare_args(b)
    return parser


def _config(args):
    from teacher.config import load_teacher_config

    return load_teacher_config(args.config, args.overrides)


def _phase(name: str, args) -> dict:
    from teacher.shards import resolve_rank_world

    cfg = _config(args)
    rank, world = resolve_rank_world(args.rank, args.world)
    module = __import__(f"teacher.{name}", fromlist=[f"{name}_phase"])
    t0 = time.perf_counter()
    stats = getattr(module, f"{name}_phase")(cfg, rank, world, progress=not args.quiet)
    stats.update(phase=name, rank=rank, world=world, seconds=round(time.perf_counter() - t0, 2))
    print(json.dumps(stats))
    return stats


def _run(args) -> int:
    from teacher.shards import resolve_rank_world

    cfg = _config(args)
    rank, world = resolve_rank_world(args.rank, args.world)
    phases = [p for p in args.phases.split(",") if p]
    bad = [p for p in phases if p not in (*PHASES, "merge")]
    if bad:
        raise Dllm2RecError(f"--phases: unknown phase(s) {bad}")
    for name in [p for p in PHASES if p in phases]:
        if name == "ground" and world > 1 and not _items_ready(cfg):
            # grounding needs every shard's item embeddings; the last shard to finish embedding
            # grounds its rows at once, earlier ones on a rerun (or in a separate `ground` step)
            print(f"shard {rank}/{world}: not every shard has embedded its items yet; skipping ground. "
                  "Rerun `teacher run` (finished phases are skipped) or `teacher ground` once all shards have embedded.")
            return 0
        if cfg.phase_process == "subprocess":
            # a fresh process per phase frees the previous engine's memory completely
            cmd = [sys.executable, "-m", "teacher", name, "--rank", str(rank), "--world", str(world)]
            cmd += (["--config", args.config] if args.config else []) + (["--quiet"] if args.quiet else [])
            rc = subprocess.call(cmd + list(args.overrides))
            if rc != 0:
                print(f"error: phase {name} failed with exit status {rc}", file=sys.stderr)
                return rc
        else:
            import gc

            ns = argparse.Namespace(**{**vars(args), "rank": rank, "world": world})
            _phase(name, ns)
            gc.collect()  # drop the phase's engine before the next one starts
    if "merge" in phases:
        if world == 1:
            _merge(args)
        else:
            print(f"shard {rank}/{world} done; run `python -m teacher merge` once every shard has finished")
    return 0


def _items_ready(cfg) -> bool:
    from teacher.artifacts import load_teacher_data, work_dir
    from teacher.fingerprints import embed_fingerprint
    from teacher.shards import ShardError, finished_parts

    try:
        finished_parts(work_dir(cfg), "embed", "items", embed_fingerprint(cfg, load_teacher_data(cfg.dataset, split_limits(cfg))))
    except ShardError:
        return False
    return True


def _constrained(args) -> int:
    from teacher.constrained import merge_constrained

    if not args.merge:
        stats = _phase("constrained", args)
        if stats["world"] > 1:
            print(f"shard {stats['rank']}/{stats['world']} done; run `teacher constrained --merge` once every shard has finished")
            return 0
    manifest = merge_constrained(_config(args), progress=not args.quiet)
    print(json.dumps({"merged": manifest["splits"], "metrics": manifest["metrics"]}))
    return 0


def _merge(args) -> None:
    from teacher.artifacts import merge

    manifest = merge(_config(args))
    print(json.dumps({"merged": manifest["splits"], "metrics": manifest["metrics"], "diversity": manifest["diversity"]}))


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`--rank 0 limit=8`): argparse leaves those over
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.phase is None:
        parser.print_help()
        return 0
    try:
        if args.phase == "model":
            from teacher.model import fetch_smollm2, model_digest, resolve_base_model

            if args.action == "fetch":
                print(fetch_smollm2(args.cache))
            elif args.action == "convert":
                if not args.gguf:
                    raise Dllm2RecError("model convert: --gguf FILE is required")
                print(fetch_smollm2(args.cache, gguf=args.gguf))
            else:
                print(model_digest(resolve_base_model(args.path)))
        elif args.phase in PHASES:
            _phase(args.phase, args)
        elif args.phase == "merge":
            _merge(args)
        elif args.phase == "sweep-gamma":
            from teacher.collab_sweep import run_sweep

            run_sweep(_config(args), args.gammas, args.split, args.select, args.rows)
        elif args.phase == "constrained":
            return _constrained(args)
        elif args.phase == "run":
            return _run(args)
        elif args.phase == "export-tocf":
            from teacher.artifacts import export_tocf

            print(export_tocf(args.teacher, args.out, args.top_n))
        elif args.phase == "import":
            from teacher.importer import import_rankings

            m = import_rankings(args.rankings, args.score_kind, args.dataset, args.out, args.item_embeddings,
                                args.min_top_n)
            print(json.dumps({"out": args.out, "splits": m["splits"], "metrics": m["metrics"]}))
        elif args.phase == "from-run":
            from teacher.ensemble import ensemble_from_runs
            from teacher.from_run import from_run

            if len(args.run) == 1:
                m = from_run(args.run[0], args.out, args.top_n, args.dataset)
            else:
                m = ensemble_from_runs(args.run, args.out, args.top_n, args.dataset)
            print(json.dumps({"out": args.out, "splits": m["splits"], "metrics": m["metrics"]}))
        elif args.phase in ("finetune", "merge-lora"):
            return _run_finetune_phase(args)
        elif args.phase == "bench" and args.compare:
            from teacher.bench_compare import run_compare
            from teacher.finetune import load_finetune_config

            cfg = _config(args)
            ft = load_finetune_config(args.finetune_config, [f"dataset={cfg.dataset}", *args.finetune_set])
            run_compare(cfg, ft, args.rows, args.finetune_rows, args.repeats, args.out,
                        [s for s in args.only.split(",") if s], args.greedy_batch, args.embed_batch, args.embed_rows,
                        args.step_tokens)
        elif args.phase == "bench":
            from teacher.bench import run_bench

            run_bench(_config(args), args.rows, args.repeats, args.out, [s for s in args.only.split(",") if s])
    except Dllm2RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_compare_args(b) -> None:
    """``teacher bench --compare`` options (teacher/bench_compare.py)."""
    b.add_argument("--compare", action="store_true",
                   help="old vs new CPU paths, alternating (teacher/bench_compare.py); --only then picks of finetune,logits,greedy,embed,constrained")
    b.add_argument("--finetune-config", default="launch/configs/teacher_finetune_ml100k.yaml",
                   help="--compare: the fine-tune config whose LoRA and micro-batch are timed")
    b.add_argument("--finetune-rows", type=int, default=8, help="--compare: training prompts per fine-tune run")
    b.add_argument("--finetune-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="--compare: overrides of the fine-tune config, e.g. train_on_inputs=false micro_batch_size=4")
    b.add_argument("--greedy-batch", type=int, default=16, help="--compare: rows per vLLM call on the new greedy path")
    b.add_argument("--embed-batch", type=int, default=512, help="--compare: titles per vLLM call on the new embedding path")
    b.add_argument("--embed-rows", type=int, default=256, help="--compare: titles embedded per run")
    b.add_argument("--step-tokens", type=int, default=0,
                   help="--compare: also time greedy on an engine with this many tokens per step (0 = skip)")


def _add_finetune_parsers(sub) -> None:
    """Register ``finetune`` and ``merge-lora`` on the ``python -m teacher`` sub-parser table."""
    f = sub.add_parser("finetune", help="LoRA fine-tune of the teacher LLM (BIGRec); Accelerate/DeepSpeed")
    f.add_argument("--config", default=None, help="launch/configs/teacher_finetune_*.yaml")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 lr=1e-4")
    f.add_argument("--force", action="store_true", help="redo even if output_dir is complete")
    m = sub.add_parser("merge-lora", help="merge a LoRA adapter into the base weights (HF folder for vLLM)")
    m.add_argument("--adapter", required=True, help="fine-tune output_dir (or a bare PEFT adapter folder)")
    m.add_argument("--output", required=True, help="merged HF model folder to write")
    m.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    m.add_argument("--base-model", default=None, help="override the base recorded in the manifest")


def _run_finetune_phase(args) -> int:
    """Dispatch ``finetune`` / ``merge-lora`` (called from ``teacher.cli.run``)."""
    if args.phase == "finetune":
        from teacher.finetune import finetune, load_finetune_config

        finetune(load_finetune_config(args.config, args.overrides), force=args.force)
    else:
        from teacher.lora import merge_lora

        print(merge_lora(args.adapter, args.output, args.dtype, args.base_model))
    return 0
