"""Our transformer vs Hugging Face `LlamaForCausalLM`, same config, same weights, same threads.

Two measurements, each printed with the ratio ours / theirs:

  train   tokens/s of a full training step (forward + backward + AdamW) on random tokens,
          against transformers eager: ours eager with the plain loss, with the fused loss (the
          CPU default, `train.fused_loss`), with `train.compile` and the plain head compiled too,
          and with `train.compile` as it runs on CPU (compiled blocks, fused loss); each copy of
          our model is set up by the trainer's own `prepare_for_training` and trained with
          the loss options of the pre-training objective (`loss_options`)
  decode  greedy tokens/s at batch 1: our `generate` (preallocated KV cache; eager and with
          compile=True) against transformers' `generate(do_sample=False)`, both producing
          `--new-tokens` tokens after the same prompt (and the same tokens: checked)

The variants alternate round by round and the median round counts, so a noisy neighbour on a
shared machine hurts all alike. Each round is timed by the wall clock and by this process's CPU
time; on a crowded machine the CPU-time rate is the steadier one (with one thread it is the work
done, not the time spent waiting for a core). Compilation happens in warm-up, outside the timing.

    OMP_NUM_THREADS=1 python benchmarks/bench_model.py --preset tiny --threads 1
    OMP_NUM_THREADS=1 python benchmarks/bench_model.py --preset small --threads 1 --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from lmforge.config import load_config
from lmforge.engine import generate
from lmforge.interop.hf import hf_config
from lmforge.model import Transformer
from lmforge.train.loop import prepare_for_training
from lmforge.train.pretrain import loss_options

LABELS = {
    "hf": "transformers",
    "ours": "ours (eager)",
    "ours_fused": "ours (fused loss)",
    "ours_compile_plain": "ours (compile, plain)",
    "ours_compile": "ours (train.compile)",
    "ours_compiled": "ours (compile=True)",
}


def hf_model(ours: Transformer):
    """transformers' own Llama/Qwen3 class for our config, holding our weights."""
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config(ours.cfg))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in ours.state_dict().items()}
    model.load_state_dict(state, strict=False)
    if ours.cfg.tie_embeddings:
        model.tie_weights()
    return model.float()


def twin(ours: Transformer) -> Transformer:
    copy = Transformer(ours.cfg)
    copy.load_state_dict(ours.state_dict())
    return copy


def median_rates(fns: dict[str, Callable[[], int]], rounds: int) -> dict[str, tuple[float, float]]:
    """Alternate the callables (each returns the tokens it processed) `rounds` times; return
    the median (wall-clock, CPU-time) tokens/s of each."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = fn()
            rates[name].append((tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)))
    return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in rates.items()}


def bench_train(preset: str, base_overrides: list[str], ours, theirs, batch: int, seq: int, steps: int, rounds: int, compiled: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, ours.cfg.vocab_size, (batch, seq), generator=g)
    y = torch.randint(0, ours.cfg.vocab_size, (batch, seq), generator=g)
    cpu = torch.device("cpu")

    def runner(name: str, model, loss_fn) -> Callable[[], int]:
        model.train()
        # Fused AdamW on both sides: the default of `lmforge pretrain` and of transformers'
        # Trainer (`adamw_torch_fused`).
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> None:
            loss_fn(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step()  # warm-up: allocator, optimizer state, compilation
        step()
        print(f"  warm-up {LABELS[name]}: {time.perf_counter() - t0:.1f}s", flush=True)

        def run() -> int:
            for _ in range(steps):
                step()
            return batch * seq * steps

        return run

    def trainer_model(overrides: list[str]) -> tuple[Transformer, Callable]:
        """A copy of our model set up exactly as `lmforge pretrain` would with these settings,
        and the loss the pre-training objective computes with them."""
        run_cfg = load_config(preset=preset, overrides=[*base_overrides, *overrides])
        model = prepare_for_training(twin(ours), run_cfg.train, cpu)
        options = loss_options(model, run_cfg.train, cpu)
        return model, lambda m: m.loss(x, y, **options)

    runners = {
        # A copy: training moves the weights, and decoding later must start from the same ones.
        "hf": runner("hf", copy.deepcopy(theirs), lambda m: m(input_ids=x, labels=y, shift_labels=y).loss),
        "ours": runner("ours", *trainer_model(["train.fused_loss=off"])),
        "ours_fused": runner("ours_fused", *trainer_model([])),  # the CPU default
    }
    if compiled:
        # Compiled blocks with the plain head compiled too (fused loss off), then what
        # train.compile=true does by default on CPU: compiled blocks and the fused loss.
        runners["ours_compile_plain"] = runner(
            "ours_compile_plain", *trainer_model(["train.compile=true", "train.fused_loss=off"]))
        runners["ours_compile"] = runner("ours_compile", *trainer_model(["train.compile=true"]))
    return median_rates(runners, rounds)


def bench_decode(ours, theirs, prompt_len: int, new_tokens: int, rounds: int, compiled: bool):
    ours.eval()
    theirs.eval()
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    reference = hf_generate(theirs, prompt, new_tokens)
    runners = {
        "hf": lambda: hf_generate(theirs, prompt, new_tokens).shape[1] - prompt_len,
        "ours": lambda: generate(ours, prompt, new_tokens, temperature=0).shape[1] - prompt_len,
    }
    same = torch.equal(generate(ours, prompt, new_tokens, temperature=0), reference)
    if compiled:
        t0 = time.perf_counter()
        out = generate(ours, prompt, new_tokens, temperature=0, compile=True)
        print(f"  compile (first generate with compile=True): {time.perf_counter() - t0:.1f}s", flush=True)
        same = same and torch.equal(out, reference)
        runners["ours_compiled"] = (
            lambda: generate(ours, prompt, new_tokens, temperature=0, compile=True).shape[1] - prompt_len
        )
    print(f"  greedy tokens identical to transformers: {same}")
    return median_rates(runners, rounds)


def hf_generate(theirs, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)


def report(title: str, rates: dict[str, tuple[float, float]], labels: dict[str, str] = LABELS) -> None:
    """One table of wall and CPU tokens/s per implementation, each as a ratio to transformers'."""
    print(title)
    print(f"  {'':<22}{'wall tok/s':>12}{'ratio':>8}{'cpu tok/s':>12}{'ratio':>8}")
    hf_wall, hf_cpu = rates["hf"]
    for name, (wall, cpu) in rates.items():
        print(f"  {labels[name]:<22}{wall:>12,.0f}{wall / hf_wall:>7.2f}x{cpu:>12,.0f}{cpu / hf_cpu:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds; the median counts (fewer rounds move the ratio by ~0.1)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="measure eager mode only")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    # The decode benchmark needs room for prompt + new tokens.
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.prompt_len + args.new_tokens, args.seq_len)
    ours = Transformer(cfg.model)
    theirs = hf_model(ours)
    import transformers

    n = sum(p.numel() for p in ours.parameters())
    print(f"preset {args.preset}: {n / 1e6:.1f}M parameters, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.threads} threads")
    compiled = not args.no_compile
    if not args.skip_train:
        rates = bench_train(args.preset, args.overrides, ours, theirs, args.batch_size, args.seq_len, args.steps, args.rounds, compiled)
        report(f"train  (fwd+bwd+AdamW, batch {args.batch_size} x seq {args.seq_len})", rates)
    if not args.skip_decode:
        rates = bench_decode(ours, theirs, args.prompt_len, args.new_tokens, args.rounds, compiled)
        report(f"decode (greedy, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens)", rates)


if __name__ == "__main__":
    main()
