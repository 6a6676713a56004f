"""`lmforge tokenizer train | encode | decode | stats | export`: argument declarers and handlers."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.cli import nonnegative_int, positive_int
from lmforge.errors import UserError
from lmforge.outputs import add_force_arg, check_output
from lmforge.runlock import run_lock

if TYPE_CHECKING:
    from lmforge.data.sources import ReadReport


def _strict_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict", action="store_true",
                        help="malformed input (bad JSONL lines, non-UTF-8 bytes) is an error "
                             "(default: data.strict; otherwise replaced or skipped and reported)")


def _warn(report: ReadReport) -> None:
    """The malformed input that was skipped or replaced, as `data prepare` reports it."""
    from lmforge.data.sources import warning_lines

    if report.malformed or report.decode_errors or report.empty_files:
        print("\n".join(warning_lines(report.summary())), file=sys.stderr)


def _tokenizer_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer directory")


# -- train -------------------------------------------------------------------------------------


def train_args(parser: argparse.ArgumentParser) -> None:
    from lmforge.cli import add_config_args

    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files, directories, glob patterns or .jsonl files")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help="256 bytes + merges + special tokens (default: tokenizer.vocab_size)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    add_force_arg(parser)
    parser.add_argument("--text-field", metavar="NAME",
                        help="field holding the text in .jsonl records (default: data.text_field)")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="processes counting chunks (default: all cores)")
    _strict_arg(parser)
    add_config_args(parser)


def train(args: argparse.Namespace) -> int:
    from lmforge.cli import config_from_args
    from lmforge.data.sources import ReadReport
    from lmforge.tokenizer.sources import expand_inputs, iter_texts
    from lmforge.tokenizer.train import train_tokenizer

    if args.vocab_size is not None:
        args.overrides = [*args.overrides, f"tokenizer.vocab_size={args.vocab_size}"]
    run_cfg = config_from_args(args)
    cfg = run_cfg.tokenizer
    text_field = args.text_field or run_cfg.data.text_field
    files = expand_inputs(args.input)  # fail on a bad path before any work
    check_output(args.out, args.force)
    start = time.perf_counter()
    report = ReadReport()
    texts = iter_texts([str(f) for f in files], text_field=text_field,
                       strict=args.strict or run_cfg.data.strict, report=report)
    with run_lock(args.out, "tokenizer train"):
        tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, pattern=cfg.split_pattern,
                              special_tokens=cfg.special_tokens, workers=args.workers)
        path = tok.save(args.out)
    _warn(report)
    print(f"trained {tok!r} on {report.documents} document(s) in {len(files)} file(s) in "
          f"{time.perf_counter() - start:.1f}s -> {path}")
    if tok.vocab_size < cfg.vocab_size:
        print(f"note: the corpus ran out of pairs to merge; vocab_size is {tok.vocab_size}, "
              f"not {cfg.vocab_size}", file=sys.stderr)
    return 0


# -- encode / decode ---------------------------------------------------------------------------


def encode_args(parser: argparse.ArgumentParser) -> None:
    _tokenizer_arg(parser)
    parser.add_argument("--allow-special", action="store_true",
                        help="read special tokens in the text as special (default: as plain text)")


def encode(args: argparse.Namespace) -> int:
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = _read_stdin_text()
    ids = tok.encode(text, allowed_special="all" if args.allow_special else ())
    print(" ".join(map(str, ids)))
    return 0


def decode_args(parser: argparse.ArgumentParser) -> None:
    _tokenizer_arg(parser)


def decode(args: argparse.Namespace) -> int:
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    words = sys.stdin.read().split()
    try:
        ids = [int(w) for w in words]
    except ValueError:
        bad = next(w for w in words if not w.lstrip("-").isdigit())
        raise UserError(f"stdin: {bad!r} is not a token id (expected integers separated by spaces)") from None
    try:
        data = tok.decode_bytes(ids)
    except ValueError as e:
        raise UserError(f"stdin: {e}") from None
    sys.stdout.buffer.write(data)  # the exact bytes, even where they are not valid UTF-8
    sys.stdout.flush()
    return 0


def _read_stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"stdin: not UTF-8 text (byte {e.start})") from None


# -- stats -------------------------------------------------------------------------------------


def stats_args(parser: argparse.ArgumentParser) -> None:
    _tokenizer_arg(parser)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files, directories, glob patterns or .jsonl files")
    parser.add_argument("--text-field", default="text", metavar="NAME")
    parser.add_argument("--top", type=nonnegative_int, default=10, metavar="K", help="longest tokens to list")
    _strict_arg(parser)


def stats(args: argparse.Namespace) -> int:
    from lmforge.data.sources import ReadReport
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.sources import iter_texts
    from lmforge.tokenizer.stats import tokenizer_stats

    tok = load_tokenizer(args.tokenizer)
    report = ReadReport()
    texts = iter_texts(args.input, text_field=args.text_field, strict=args.strict, report=report)
    s = tokenizer_stats(tok, texts, longest=args.top)
    _warn(report)
    n_regular = tok.vocab_size - s["special_tokens"]
    per_token = s["val_bytes_per_token"]
    print(f"tokenizer        {Path(args.tokenizer)}  ({tok.vocab_size} tokens, {tok.content_hash[:19]})")
    print(f"input            {s['val_bytes']:,} bytes -> {s['val_tokens']:,} tokens")
    print(f"bytes per token  {per_token:.3f}" if per_token else "bytes per token  - (no tokens)")
    print(f"vocabulary used  {s['regular_tokens_used']:,} of {n_regular:,} regular tokens "
          f"({100 * s['regular_tokens_used_share']:.1f}%)")
    print(f"longest tokens   (id, bytes, uses in input; whitespace runs left out, the longest has "
          f"{s['longest_whitespace_token']} bytes)")
    for t in s["longest_tokens"]:
        print(f"  {t['id']:>7}  {tok.token_bytes(t['id'])!r}  {t['uses']}")
    return 0


# -- export ------------------------------------------------------------------------------------


def export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=("hf", "tiktoken"),
                        help="hf: tokenizer.json (+config) for tokenizers/transformers; "
                             "tiktoken: base64 rank file + pattern and specials")
    _tokenizer_arg(parser)
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="directory to write into (files of the same names are refused "
                             "without --force)")
    add_force_arg(parser)


def export(args: argparse.Namespace) -> int:
    from lmforge.tokenizer.export import EXPORT_FILES, export_hf, export_tiktoken

    check_output(args.out, args.force, writes=EXPORT_FILES[args.format])
    with run_lock(args.out, "tokenizer export"):
        out = (export_hf if args.format == "hf" else export_tiktoken)(args.tokenizer, args.out)
    print(f"wrote {args.format} tokenizer to {out}")
    return 0
