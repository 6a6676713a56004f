"""The inference engine vs transformers' `generate`, same config, same weights, same threads.

  batched  16 prompts of different lengths, greedy, `--new-tokens` each: our `Engine` (one ragged
           KV cache, continuous batching) against transformers' `generate` on the left-padded
           batch with its attention mask
  batch-1  one prompt, greedy: the `Engine`, our batch-1 `generate`, and transformers' `generate`

Both runs time the `Engine` eager and with `compile=True` (its decode step compiled for batches
up to 16, padded to 1, 2, 4, 8 or 16 rows; greedy rows decode `greedy_run` = 4 tokens a call),
and the compiled `Engine` at one token a call (`greedy_run=1`) for comparison.

Tokens/s count generated tokens; rounds alternate and the median counts (see bench_model.py,
whose helpers this reuses). Stop tokens are off on both sides so every row runs to the end.

    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py --preset tiny --threads 1
    python benchmarks/bench_engine.py --preset gpt2-124m --device cuda --dtype bf16   # both in bf16
"""

from __future__ import annotations

import argparse

import torch
from bench_model import hf_generate, hf_model, median_rates, report

from lmforge.config import load_config
from lmforge.engine import GREEDY_RUN, Engine, SamplingParams, generate
from lmforge.model import Transformer

LABELS = {"hf": "transformers", "engine": "ours (Engine)", "compiled": "ours (Engine, compile)",
          "step": "ours (compile, 1/call)", "batch1": "ours (generate)"}


class ByteTokenizer:
    """Just what the engine needs of a tokenizer, with no stop tokens: ids decode to one byte."""

    special_tokens: dict[str, int] = {}

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode_bytes(self, ids) -> bytes:
        return bytes(i % 128 for i in ids)


def ragged_prompts(n: int, vocab: int, shortest: int, longest: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.linspace(shortest, longest, n).round().int().tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


def hf_batch(theirs, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers on the left-padded batch; each row's new tokens."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=theirs.device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = theirs.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch1-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights of both models")
    parser.add_argument("--greedy-run", type=int, default=GREEDY_RUN,
                        help="greedy steps a compiled call of the default compiled Engine (1: one step a call)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, 64 + max(args.new_tokens, args.batch1_tokens))
    ours = Transformer(cfg.model).eval()
    theirs = hf_model(ours).eval().to(args.device, dtype)
    ours = ours.to(args.device, dtype)
    engine = Engine(ours, ByteTokenizer(cfg.model.vocab_size), max_batch=args.prompts)
    compiled = Engine(ours, ByteTokenizer(cfg.model.vocab_size), max_batch=args.prompts, compile=True,
                      greedy_run=args.greedy_run)
    step = Engine(ours, ByteTokenizer(cfg.model.vocab_size), max_batch=args.prompts, compile=True, greedy_run=1)
    print(f"compiled the Engine's decode step for batches up to {compiled.compile_max_batch} "
          f"in {compiled.warm_up(sampled=False) + step.warm_up(sampled=False):.1f} s (the greedy graphs: "
          f"the bench is greedy)")
    print(f"preset {args.preset}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
          f"torch {torch.__version__}, {args.threads} threads, {args.device} {args.dtype}")

    prompts = ragged_prompts(args.prompts, cfg.model.vocab_size, 8, 64)
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0)
    ours_rows = [c[0].token_ids for c in engine.generate(prompts, greedy)]
    same = sum(a == b for a, b in zip(ours_rows, hf_batch(theirs, prompts, args.new_tokens), strict=True))
    print(f"  rows with greedy tokens identical to transformers: {same}/{len(prompts)}")
    total = args.prompts * args.new_tokens
    rates = median_rates({
        "hf": lambda: len(hf_batch(theirs, prompts, args.new_tokens)) * args.new_tokens,
        "engine": lambda: len(engine.generate(prompts, greedy)) * args.new_tokens,
        "compiled": lambda: len(compiled.generate(prompts, greedy)) * args.new_tokens,
        "step": lambda: len(step.generate(prompts, greedy)) * args.new_tokens,
    }, args.rounds)
    report(f"batched (greedy, {args.prompts} prompts of 8..64 tokens, {args.new_tokens} new each, "
           f"{total} tokens)", rates, LABELS)

    prompt = prompts[0]
    one = SamplingParams(max_tokens=args.batch1_tokens, temperature=0)
    n = args.batch1_tokens
    idx = torch.tensor([prompt], device=args.device)
    reference = hf_generate(theirs, idx, n)[0, len(prompt):].tolist()
    print(f"  batch-1 greedy tokens identical to transformers: "
          f"{engine.generate([prompt], one)[0][0].token_ids == reference} (Engine), "
          f"{compiled.generate([prompt], one)[0][0].token_ids == reference} (Engine, compile), "
          f"{step.generate([prompt], one)[0][0].token_ids == reference} (1 token a call)")
    rates = median_rates({
        "hf": lambda: hf_generate(theirs, idx, n).shape[1] - len(prompt),
        "engine": lambda: len(engine.generate([prompt], one)[0][0].token_ids),
        "compiled": lambda: len(compiled.generate([prompt], one)[0][0].token_ids),
        "step": lambda: len(step.generate([prompt], one)[0][0].token_ids),
        "batch1": lambda: generate(ours, idx, n, temperature=0).shape[1] - len(prompt),
    }, args.rounds)
    report(f"batch-1 (greedy, prompt {len(prompt)}, {n} new tokens)", rates, LABELS)


if __name__ == "__main__":
    main()
