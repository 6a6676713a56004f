"""`lmforge data prepare` and `lmforge data inspect`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmforge.cli import add_config_args, config_from_args, nonnegative_int, positive_int
from lmforge.errors import UserError
from lmforge.outputs import add_force_arg, check_output
from lmforge.runlock import run_lock


def prepare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", default=[], metavar="PATH",
                        help="a file, directory, glob or builtin:default (repeatable); "
                             "replaces data.sources")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory to use; without it one is trained on the "
                             "curated train split with the [tokenizer] config")
    parser.add_argument("--out", default="data", metavar="DIR",
                        help="output shards directory (default: data); a directory this command "
                             "wrote is continued, any other non-empty one refused without --force")
    add_force_arg(parser)
    parser.add_argument("--strict", action="store_true",
                        help="malformed input (bad JSONL lines, non-UTF-8 bytes) is an error")
    add_config_args(parser)


def prepare(args: argparse.Namespace) -> int:
    from lmforge.data.prepare import format_table, prepare
    from lmforge.data.sources import warning_lines

    cfg = config_from_args(args)
    if args.source:
        cfg.data.sources = list(args.source)
    if args.strict:
        cfg.data.strict = True
    cfg.validate().hold_out_one_evaluation()
    out = Path(args.out)
    ours = (out / "manifest.json").is_file() or (out / "curated").is_dir()
    check_output(out, args.force or ours)  # continuing its own earlier work is not overwriting
    start = time.perf_counter()
    with run_lock(out, "data prepare"):
        manifest = prepare(cfg, out, tokenizer_dir=args.tokenizer)
    seconds = time.perf_counter() - start
    read = manifest["read"]
    print("\n".join(warning_lines(read)))
    stats = {"read": read, "stages": manifest["stages"], "splits": manifest["splits"]}
    print(format_table(stats))
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens in {len(info['shards'])} shards")
    removed = next((s for s in manifest["stages"] if s["name"] == "decontam (drop)" and s["removed_docs"]), None)
    if removed:  # which references (files, or the benchmark tasks of eval:...) they overlapped
        print(f"removed by decontamination ({removed['removed_docs']}), e.g.: " + ", ".join(
            f"{e['id']} ({', '.join(e.get('references', []))})" for e in removed["examples"][:10]))
    if manifest["flagged"]:
        print(f"flagged by decontamination ({len(manifest['flagged'])}): "
              + ", ".join(manifest["flagged"][:10]))
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["seconds"].items())
    if manifest["resumed"]:
        print(f"curation reused from an earlier run; wrote {args.out}/manifest.json ({phases})")
    else:
        rate = read["bytes"] / 1e6 / max(seconds, 1e-9)
        print(f"wrote {args.out}/manifest.json in {seconds:.1f}s, {rate:.2f} MB/s ({phases})")
    return 0


def inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a shards directory written by `data prepare`")
    parser.add_argument("--samples", type=nonnegative_int, default=3, help="decoded windows to print")
    parser.add_argument("--seq-len", type=positive_int, default=64, help="tokens per sample window")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--seed", type=nonnegative_int, default=0)


def inspect(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path}: not found; is {root} a directory written by "
                        "`lmforge data prepare`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{manifest_path}: not valid JSON ({e})") from None
    try:
        return _inspect(args, root, manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{manifest_path}: not a shards manifest (field {e} missing or malformed)") from None


def _inspect(args: argparse.Namespace, root: Path, manifest: dict) -> int:
    import numpy as np

    from lmforge.data.prepare import format_table
    from lmforge.data.shards import inside_root, open_shard
    from lmforge.tokenizer import load_tokenizer

    where = str(root / "manifest.json")
    tok_info = manifest["tokenizer"]
    print(f"sources: {', '.join(manifest['sources'])}")
    print(f"tokenizer: {tok_info['hash']} (vocab {tok_info['vocab_size']}), dtype {manifest['dtype']}")
    print(format_table({"read": manifest["read"], "stages": manifest["stages"],
                        "splits": manifest["splits"]}))
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            open_shard(inside_root(root, shard["file"], where), verify=True)  # raises naming a damaged file
        print(f"{split}: {info['tokens']:,} tokens in {len(info['shards'])} shards (checksums ok)")
    shards = manifest["splits"][args.split]["shards"]
    if not shards or args.samples <= 0:
        return 0
    tok = load_tokenizer(inside_root(root, tok_info["dir"], where))
    rng = np.random.default_rng(args.seed)
    for i in range(args.samples):
        tokens = open_shard(inside_root(root, shards[int(rng.integers(len(shards)))]["file"], where), verify=False)
        start = int(rng.integers(max(1, len(tokens) - args.seq_len)))
        window = tokens[start : start + args.seq_len].tolist()
        print(f"--- sample {i + 1} ({args.split}, tokens {start}..{start + len(window)}) ---")
        print(tok.decode(window))
    return 0
