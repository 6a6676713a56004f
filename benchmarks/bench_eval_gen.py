"""GSM8K generation throughput: `lmforge eval`'s engine path vs transformers' `generate`.

Side by side in one run, same weights (transformers' own Llama/Qwen3 class holding them, see
bench_model.py), same threads, the same first `--limit` GSM8K test items with the same prompt ids
(the standard 8-shot base prompt, cut to the model's context as `lmforge eval` cuts it), greedy,
up to the same number of new tokens, stopping at the same places (<|endoftext|>, <|end|>, and
GSM8K's stop strings "Question:" and a blank line):

  lmforge       lmforge.eval.generation.generate: the Engine, continuous batching over
                `--batch-size` rows (a finished row is replaced by the next item at once)
  transformers  `generate` on batches of `--batch-size` items in order, left-padded with the
                attention mask, stopped per row by a stopping criterion that decodes the row
                (as lm-evaluation-harness' `hf` model does); a batch runs until its last row stops

Items/s is the number that matters for an evaluation; new tok/s counts the tokens of the answers
(re-encoded, up to each row's stop) (the same on both sides when the answers agree, which the last column checks). Wall
clock and process CPU time both; on a shared machine CPU time is the steadier one.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_gen.py --checkpoint /work/bases/tiny --limit 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_model import hf_model

from lmforge.engine import STOP_TOKENS
from lmforge.eval.code import truncate
from lmforge.eval.generation import GSM8K_TOKENS, fit_prompt, generate, gsm8k_prompts
from lmforge.eval.runner import EvalOptions
from lmforge.eval.tasks import gsm8k


def hf_generate_all(theirs, tokenizer, prompts: list[list[int]], batch: int, context: int) -> list[str]:
    """transformers' `generate` over batches of `batch` prompts; each row's text up to its stop."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stop_ids = [tokenizer.special_tokens[t] for t in STOP_TOKENS if t in tokenizer.special_tokens]

    class StopStrings(StoppingCriteria):
        """Per row: done once its new tokens hold a stop token or a stop string."""

        def __init__(self, width: int) -> None:
            self.width = width

        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            done = []
            for row in input_ids[:, self.width:].tolist():
                text = tokenizer.decode_bytes([t for t in row if t not in stop_ids]).decode("utf-8", "replace")
                done.append(any(t in stop_ids for t in row) or any(s in text for s in gsm8k.STOP))
            return torch.tensor(done, device=input_ids.device)

    texts = []
    for start in range(0, len(prompts), batch):
        rows = prompts[start:start + batch]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.eot_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=context - width,
                                  eos_token_id=None, pad_token_id=tokenizer.eot_id,
                                  stopping_criteria=StoppingCriteriaList([StopStrings(width)]))
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            text = tokenizer.decode_bytes(row[:cut]).decode("utf-8", "replace")
            texts.append(truncate(text, gsm8k.STOP))
    return texts


def timed(fn) -> tuple[float, float, list[str]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint or run directory")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shots", type=int, default=gsm8k.STANDARD_SHOTS)
    args = parser.parse_args()

    from lmforge.eval.cli import load_for_eval

    model, tok = load_for_eval(args.checkpoint)
    theirs = hf_model(model).eval()
    context = model.cfg.max_seq_len
    problems = gsm8k.load()[0][:args.limit]
    prompts, stop = gsm8k_prompts(tok, problems, args.shots, chat=False)
    # The prompts as `lmforge eval` cuts them, so both sides see the same ids and room to answer.
    fitted = [fit_prompt(p, context, GSM8K_TOKENS)[0] for p in prompts]
    options = EvalOptions(batch_size=args.batch_size, progress=False)

    def ours() -> list[str]:
        texts, _ = generate(model, tok, fitted, options, "gsm8k", GSM8K_TOKENS, stop)
        return [t[0] for t in texts]

    ours(), hf_generate_all(theirs, tok, fitted[:2], 2, context)  # warm-up
    t_ours, cpu_ours, texts_ours = timed(ours)
    t_hf, cpu_hf, texts_hf = timed(lambda: hf_generate_all(theirs, tok, fitted, args.batch_size, context))
    tokens = sum(len(tok.encode(t)) for t in texts_ours)
    same = sum(a == b for a, b in zip(texts_ours, texts_hf, strict=True))
    n = len(problems)
    print(f"model {args.checkpoint} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"context {context}), {torch.get_num_threads()} threads, {n} GSM8K items, "
          f"{args.shots}-shot prompts cut to {max(map(len, fitted))} tokens, batch {args.batch_size}")
    print(f"{'':<14} {'items/s':>9} {'new tok/s':>10} {'seconds':>8} {'CPU s':>7}")
    for name, wall, cpu in (("transformers", t_hf, cpu_hf), ("lmforge", t_ours, cpu_ours)):
        print(f"{name:<14} {n / wall:>9.2f} {tokens / wall:>10.0f} {wall:>8.2f} {cpu:>7.2f}")
    print(f"ratio (lmforge / transformers): {t_hf / t_ours:.2f}x wall, {cpu_hf / cpu_ours:.2f}x CPU time; "
          f"identical answers {same}/{n}")


if __name__ == "__main__":
    main()
