"""``python -m dllm2rec data <action>``: fetch, prepare, import/export the reference format, info.

Typical first session::

    python -m dllm2rec data fetch ml-100k                 # downloads once, prints the folder
    python -m dllm2rec data prepare --source ml-100k --out runs/data/ml-100k
    python -m dllm2rec data info runs/data/ml-100k
    python -m dllm2rec data import-reference --input ../shared/data/dllm2rec-games \\
        --out runs/data/games --domain games
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dllm2rec.errors import DataError

SOURCES = ("ml-100k", "ml-1m", "ml-10m", "recbole", "amazon2014", "amazon2018")
DEFAULT_DOMAIN = {"ml-100k": "movies", "ml-1m": "movies", "ml-10m": "movies", "recbole": "movies",
                  "amazon2014": "toys", "amazon2018": "games"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    sub = parser.add_subparsers(dest="action", metavar="<action>")

    p = sub.add_parser("fetch", help="download a public example dataset into the cache and print its folder")
    p.add_argument("name", choices=["ml-100k"], help="ml-100k: MovieLens-100K from the recbole==1.2.1 wheel")

    p = sub.add_parser("prepare", help="raw interaction log -> dataset folder (windows + 80/10/10 time split)",
                       description="Apply the BIGRec/DLLM2Rec protocol (SPEC section 1) to a raw log and "
                       "write a dataset folder (schema dllm2rec.dataset/1, see docs/ARCHITECTURE.md).")
    p.add_argument("--source", required=True, choices=SOURCES, help="input format")
    p.add_argument("--input", type=Path, help="folder with the raw files: ml-100k (u.data+u.item or "
                   "ml-100k.inter/.item; default: the fetched copy), ml-1m/ml-10m (ratings.dat+movies.dat), "
                   "recbole (one <name>.inter + <name>.item)")
    p.add_argument("--inter", type=Path, help="recbole: the .inter file (instead of --input)")
    p.add_argument("--item", type=Path, help="recbole: the .item file (instead of --input)")
    p.add_argument("--reviews", type=Path, help="amazon: 5-core reviews .json or .json.gz")
    p.add_argument("--meta", type=Path, help="amazon: metadata .json or .json.gz")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder (replaced atomically)")
    p.add_argument("--name", help="dataset name for the manifest (default: the --out folder name)")
    _domain_args(p)
    p.add_argument("--max-history", type=int, default=10, help="history length L (default 10)")
    p.add_argument("--min-history", type=int, default=1, help="1 = BIGRec protocol (default); "
                   "10 = the paper's MovieLens variant (only targets with 10 history items)")
    p.add_argument("--train-frac", type=float, default=0.8)
    p.add_argument("--valid-frac", type=float, default=0.1)
    p.add_argument("--no-title-year", action="store_true",
                   help="recbole: do not append ' (release_year)' to titles")

    p = sub.add_parser("import-reference", help="reference-code data/<name>/ folder -> dataset folder")
    p.add_argument("--input", type=Path, required=True, help="folder with val_data.csv, test_data.csv, "
                   "id2name.txt and optionally train_data.df / data_statis.df")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name")
    _domain_args(p, default="games")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling train_data.df and "
                   "data_statis.df (pickles run code: only for files you trust)")
    p.add_argument("--skip-train", action="store_true", help="ignore train_data.df (empty train split)")

    p = sub.add_parser("export-reference", help="dataset folder -> reference-code layout (+ teacher tocf/)")
    p.add_argument("--dataset", type=Path, required=True, help="a prepared dataset folder")
    p.add_argument("--out", type=Path, required=True, help="output data/<name>/ folder")
    p.add_argument("--pickle", action="store_true",
                   help="also write train_data.df and data_statis.df as pandas pickles (what the reference code reads)")
    p.add_argument("--teacher", type=Path, help="a teacher folder (dllm2rec.teacher/1) to export as tocf files")
    p.add_argument("--tocf-out", type=Path, help="where the tocf files go (default: <out>/../../tocf/<name>)")

    p = sub.add_parser("info", help="validate a dataset folder and print its summary")
    p.add_argument("path", type=Path)


def _domain_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from dllm2rec.data.dataset import DOMAINS

    p.add_argument("--domain", choices=sorted(DOMAINS), default=default,
                   help="words used in teacher prompts (default: by source; movies for MovieLens)")
    p.add_argument("--domain-item", help="override: singular item word, e.g. 'board game'")
    p.add_argument("--domain-items", help="override: plural item word")
    p.add_argument("--domain-verb", help="override: past-tense verb, e.g. 'played'")


def _domain(args, fallback: str) -> dict:
    from dllm2rec.data.dataset import DOMAINS

    d = dict(DOMAINS[args.domain or fallback])
    for key in ("item", "items", "verb"):
        if getattr(args, f"domain_{key}"):
            d[key] = getattr(args, f"domain_{key}")
    return d


def _read_source(args):
    from dllm2rec.data import sources

    src = args.source
    if src == "ml-100k":
        folder = args.input
        if folder is None:
            from dllm2rec.data.fetch import fetch

            folder = fetch("ml-100k")
            print(f"using fetched MovieLens-100K at {folder}")
        return sources.read_movielens_100k(folder)
    if src in ("ml-1m", "ml-10m"):
        return sources.read_movielens_dat(_required(args, "input"))
    if src == "recbole":
        inter, item = args.inter, args.item
        if inter is None or item is None:
            folder = _required(args, "input")
            inters = sorted(folder.glob("*.inter"))
            if len(inters) != 1:
                raise DataError(folder, f"expected exactly one .inter file, found {len(inters)}; use --inter/--item")
            inter, item = inters[0], inters[0].with_suffix(".item")
        return sources.read_recbole(inter, item, title_year=not args.no_title_year)
    return sources.read_amazon(_required(args, "reviews"), _required(args, "meta"),
                               version=2014 if src == "amazon2014" else 2018)


def _required(args, name: str) -> Path:
    value = getattr(args, name)
    if value is None:
        raise DataError(f"--source {args.source}", f"needs --{name}")
    return value


def _summary(manifest: dict, out: Path, seconds: float | None = None) -> None:
    c = manifest["counts"]
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    print(f"{out}: {manifest['name']}: {manifest['n_items']} items (padding id {manifest['padding_id']}), "
          f"L={manifest['max_history']}, rows train/valid/test = {c['train']}/{c['valid']}/{c['test']}{took}")
    print(f"  id_map_hash {manifest['id_map_hash']}")
    if manifest.get("stats"):
        print("  " + json.dumps(manifest["stats"], sort_keys=True))


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action is None:
        print("usage: python -m dllm2rec data {fetch,prepare,import-reference,export-reference,info} --help")
        return 1
    t0 = time.perf_counter()
    if action == "fetch":
        from dllm2rec.data.fetch import fetch

        print(fetch(args.name))
        return 0
    if action == "prepare":
        from dllm2rec.data.dataset import prepare_dataset
        from dllm2rec.data.protocol import ProtocolParams

        try:
            params = ProtocolParams(args.max_history, args.min_history, args.train_frac, args.valid_frac)
        except ValueError as exc:
            raise DataError("command line", str(exc)) from None
        raw = _read_source(args)
        m = prepare_dataset(raw, args.out, name=args.name or args.out.name, params=params,
                            domain=_domain(args, DEFAULT_DOMAIN[args.source]), source_kind=args.source)
        _summary(m, args.out, time.perf_counter() - t0)
        return 0
    if action == "import-reference":
        from dllm2rec.data.reference import import_reference

        m = import_reference(args.input, args.out, name=args.name or args.input.name, domain=_domain(args, "games"),
                             trust_pickle=args.trust_pickle, skip_train=args.skip_train)
        _summary(m, args.out, time.perf_counter() - t0)
        if m["counts"]["train"] == 0:
            print("  note: no training rows imported (train_data.df absent or skipped)")
        return 0
    if action == "export-reference":
        from dllm2rec.data.dataset import load_dataset
        from dllm2rec.data.reference import export_reference, export_teacher_tocf

        ds = load_dataset(args.dataset)
        files = export_reference(ds, args.out, write_pickle=args.pickle)
        print(f"{args.out}: wrote {', '.join(files)}")
        if args.teacher:
            tocf = args.tocf_out or args.out.resolve().parent.parent / "tocf" / args.out.name
            export_teacher_tocf(args.teacher, ds, tocf)
            print(f"{tocf}: wrote all_embeddings.pt, myrank_train.txt, confidence_train.txt")
        return 0
    if action == "info":
        from dllm2rec.data.dataset import load_dataset

        ds = load_dataset(args.path)
        _summary(ds.manifest, args.path)
        print(f"  domain {ds.manifest.get('domain')}; protocol {json.dumps(ds.manifest.get('protocol'), sort_keys=True)}")
        print(f"  first titles: {ds.titles[:3]}")
        return 0
    raise DataError("command line", f"unknown action {action!r}")
