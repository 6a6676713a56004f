"""GRPO rollouts: our Engine vs transformers' `generate`, same config, same weights, same threads.

A rollout batch as `lmforge grpo` samples it: `--prompts` prompts of different lengths, a group of
`--group` answers each, sampled at temperature 1 with no top-k / top-p, `--new-tokens` each (stop
tokens off on both sides, so every row runs to the end). Ours: one `Engine` request per prompt with
n = group (one prefill per prompt, fanned out to its rows of one ragged KV cache), as
GRPOObjective._sample submits them (without streaming: the text is decoded once at the end).
transformers: `generate(do_sample=True, num_return_sequences=group)` on the left-padded batch, the
way RL trainers built on it sample groups (each prompt is repeated group times and prefilled that
often).

Two Engines, as `lmforge grpo` builds them (lmforge.align.heldout.live_engine): eager (the
default) and with `grpo.compile=true` (its decode step compiled for every batch size up to the
rollout's rows, sampled rows drawn inside the graph). The compiled one's graphs are compiled
before the timed rounds and the seconds printed apart: a run pays them once (far less when
torch's on-disk cache already has them), a rollout after that runs at the rate shown. Like
`lmforge grpo`, the Engine is asked for no log-probabilities.

Tokens/s count generated tokens; rounds alternate and the median counts (bench_model.py's helpers).

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_rollout.py --preset tiny --threads 1
"""

from __future__ import annotations

import argparse

import torch
from bench_engine import ByteTokenizer, ragged_prompts
from bench_model import hf_model, median_rates, report

from lmforge.align.heldout import live_engine
from lmforge.config import load_config
from lmforge.engine import Engine, SamplingParams
from lmforge.model import Transformer

LABELS = {"hf": "transformers", "engine": "ours (Engine)", "compiled": "ours (Engine, compile)"}


def hf_groups(theirs, prompts: list[list[int]], group: int, new_tokens: int) -> int:
    """transformers samples `group` answers per left-padded prompt; returns the tokens generated."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=theirs.device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = theirs.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, num_return_sequences=group, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, width:].numel()


def engine_groups(engine: Engine, prompts: list[list[int]], group: int, new_tokens: int, seed: int) -> int:
    params = [SamplingParams(max_tokens=new_tokens, temperature=1.0, n=group, seed=seed + i * group)
              for i in range(len(prompts))]
    requests = [engine.submit(p, sp, stream=False) for p, sp in zip(prompts, params, strict=True)]
    while engine.step():
        pass
    return sum(len(c.token_ids) for r in requests for c in r.result())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights of both models")
    parser.add_argument("--no-compile", action="store_true",
                        help="time the eager Engine only (a GPU's compile of every batch size takes minutes)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, 64 + args.new_tokens)
    ours = Transformer(cfg.model).eval()
    theirs = hf_model(ours).eval().to(args.device, dtype)
    ours.to(args.device, dtype)
    rows = args.prompts * args.group
    engine = live_engine(ours, ByteTokenizer(cfg.model.vocab_size), rows)
    compiled = None if args.no_compile else live_engine(ours, ByteTokenizer(cfg.model.vocab_size), rows, compile=True)
    if compiled is not None:
        print(f"compiled the Engine's decode step (greedy and sampled graphs, batches up to {rows}) "
              f"in {compiled.warm_up():.1f} s")
    print(f"preset {args.preset}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
          f"torch {torch.__version__}, {args.threads} threads, {args.device} {args.dtype}")
    prompts = ragged_prompts(args.prompts, cfg.model.vocab_size, 8, 64)
    seeds = iter(range(10**6))
    runs = {
        "hf": lambda: hf_groups(theirs, prompts, args.group, args.new_tokens),
        "engine": lambda: engine_groups(engine, prompts, args.group, args.new_tokens, next(seeds) * 10**3),
    }
    if compiled is not None:
        runs["compiled"] = lambda: engine_groups(compiled, prompts, args.group, args.new_tokens, next(seeds) * 10**3)
    rates = median_rates(runs, args.rounds)
    total = args.prompts * args.group * args.new_tokens
    report(f"GRPO rollouts ({args.prompts} prompts of 8..64 tokens x {args.group} samples, "
           f"{args.new_tokens} new tokens each, {total} tokens, temperature 1)", rates, LABELS)
    for name, note in (("engine", "`lmforge grpo`'s default"), ("compiled", "grpo.compile=true")):
        if name in rates:
            print(f"  ratio {LABELS[name]} / transformers (wall): {rates[name][0] / rates['hf'][0]:.2f}x ({note})")


if __name__ == "__main__":
    main()
