"""SFT training speed (issue 14), side by side in one run:

(a) tokens/s of full fine-tuning and of LoRA: our Transformer (set up as `lmforge sft` sets it up:
    the fused loss head and the last block's MLP at the assistant targets only, our LoRALinear)
    vs transformers' LlamaForCausalLM of the same shape with peft's LoRA, in the same loop (forward, masked
    cross-entropy, backward, clip, AdamW on the trainable parameters) on the same batches of
    `builtin:chat` conversations as `lmforge sft` makes them (bucketed by length, right-padded,
    targets -100 outside assistant turns). Rounds are interleaved so the shared CPU's load hits
    all alike. Target: >= 1.3x. Ours with the head (and the last block) at every position, as
    before 2026-11-30, is timed beside it, on the same models.
(b) padding vs packing: the share of padding in the bucketed batches, and our tokens/s on the same
    conversations packed into full rows of the context instead. Packing is timed with plain causal
    attention, which lets examples see each other: a correct packed step needs a block-diagonal
    mask on top, so this is an upper bound on what packing could gain.

    python benchmarks/bench_sft.py [--checkpoint /work/bases/tiny] [--rounds 5] [--steps 6]
    python benchmarks/bench_sft.py --device cuda --preset gpt2-124m --tokenizer SHARDS/tokenizer

On CUDA both sides run under bf16 autocast with fp32 master weights (what `lmforge sft` does
there); for LoRA our frozen base is held in bf16 (`prepare_for_training`) and transformers' model
is loaded in bf16 before peft wraps it (fp32 adapters on both sides). Only wall-clock rates there.

Tokens are the real (non-padding) tokens of each batch, per second of wall-clock time and of this
process's CPU time (medians of the rounds; the ratios on CPU time, which on a shared machine does
not count the time other jobs hold the core; with more than one thread it sums theirs). Round r
times the batches after round r - 1's (all runs of a round the same ones). Not a test: numbers
for RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from bench_pretrain import hf_llama_like

from lmforge.model import loss_positions

LORA = dict(rank=16, alpha=32.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sft_batches(tokenizer, context: int, batch_size: int, n: int) -> tuple[list, list, float]:
    """(bucketed padded batches, packed batches, padding share) of n builtin:chat conversations."""
    from lmforge.finetune.data import IGNORE, bucket_batches, collate, render_examples, to_row
    from lmforge.tasks import builtin_chat

    conversations = [list(e.messages) for e in builtin_chat("train", 0, n)]
    examples, _ = render_examples(tokenizer, conversations, context)
    padded = [collate([examples[i] for i in b], tokenizer.pad_id)
              for b in bucket_batches(examples, batch_size, seed=0) if len(b) == batch_size]
    real = sum(int((x != tokenizer.pad_id).sum()) for x, _ in padded)
    padding = 1 - real / sum(x.numel() for x, _ in padded)
    learned = sum(int((y != IGNORE).sum()) for _, y in padded)
    print(f"data: assistant targets (where the loss counts) {learned / real:.1%} of the real tokens")
    # Packed: the same rows end to end, cut into full rows of the context.
    xs, ys = [], []
    for ids, mask in examples:
        x, y = to_row(ids, mask)
        xs += x
        ys += y
    rows = len(xs) // context
    x = torch.tensor(xs[:rows * context]).view(rows, context)
    y = torch.tensor(ys[:rows * context]).view(rows, context)
    per_batch = max(1, real // len(padded) // context)  # rows holding as many tokens as a padded batch
    packed = [(x[i:i + per_batch], y[i:i + per_batch]) for i in range(0, rows - per_batch + 1, per_batch)]
    assert (y[:rows] != IGNORE).any()
    return padded, packed, padding


def tokens_per_s(loss_fn, model, batches, steps: int, pad_id: int | None, first: int = 0,
                 device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """The same loop for every model: forward + masked loss, backward, clip, AdamW on what trains,
    on batches[first], batches[first + 1], ...; (tokens per wall-clock second, per second of
    this process's CPU time). On CUDA under bf16 autocast, the clock read after a device sync."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    model.train()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    tokens, start, cpu_start = 0, 0.0, 0.0
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            if cuda:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
        x, y = batches[(first + i) % len(batches)]
        # The loss positions are found on the host, where the targets are made, as SFTObjective
        # does: on the device, nonzero() would stall the queue once a step.
        positions = loss_positions(y).to(device, non_blocking=True)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss = loss_fn(model, x, y, positions)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            tokens += int((x != pad_id).sum()) if pad_id is not None else x.numel()
    if cuda:
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu_start)


def hf_loss(model, x, y, positions):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a base checkpoint (its tokenizer and weights); "
                                             "default: a random tiny model and a small tokenizer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", default="tiny", help="shape of the random model without --checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory for the random model (default: a small "
                                            "one trained on two stdlib files)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: lmforge sft's")
    parser.add_argument("--warmup-rounds", type=int, default=None,
                        help="rounds run first and not counted (default: 1 on CUDA, where every new "
                             "batch shape loads kernels the first time; 0 on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    import peft
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from lmforge.checkpoint import load_model, read_config, resolve_checkpoint
    from lmforge.config import LoraConfig, load_config
    from lmforge.finetune.lora import apply_lora
    from lmforge.finetune.sft import SFT_TRAIN_DEFAULTS
    from lmforge.model import Transformer
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.loop import prepare_for_training
    from lmforge.train.pretrain import loss_options

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.checkpoint:
        directory = resolve_checkpoint(args.checkpoint)
        cfg, tokenizer = read_config(directory), load_tokenizer(directory / "tokenizer")
    elif args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        cfg = load_config(preset=args.preset, overrides=[f"model.vocab_size={tokenizer.vocab_size}"])
    else:
        import sysconfig
        from pathlib import Path

        from lmforge.tokenizer import train_tokenizer

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        tokenizer = train_tokenizer([(stdlib / n).read_text() for n in ("textwrap.py", "argparse.py")],
                                    vocab_size=2048, workers=1)
        cfg = load_config(preset=args.preset)
    cfg.train.batch_size = args.batch_size or SFT_TRAIN_DEFAULTS["batch_size"]
    context = cfg.model.max_seq_len
    padded, packed, padding = sft_batches(tokenizer, context, cfg.train.batch_size, args.conversations)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"data: {len(padded)} bucketed batches of {cfg.train.batch_size} conversations, "
          f"padding {padding:.1%} of their tokens; packed: batches of {packed[0][0].shape[0]} x {context}")

    def ours(lora: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = load_model(args.checkpoint) if args.checkpoint else Transformer(cfg.model)
        model = apply_lora(model, LoraConfig(**LORA)) if lora else model
        return prepare_for_training(model, cfg.train, device).to(device)

    def theirs(lora: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = hf_llama_like(cfg).to(device)
        if not lora:
            return model
        if device.type == "cuda":  # a bf16 base, as peft users load it; peft keeps its adapters fp32
            model = model.to(torch.bfloat16)
        return get_peft_model(model, PeftLoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                    target_modules=HF_TARGETS))

    ours_full, ours_lora = ours(False), ours(True)
    options = loss_options(ours_full, cfg.train, device)

    def ours_loss(model, x, y, positions):  # as SFTObjective.loss: head (and last MLP) at the targets only
        return model.loss(x, y, positions=positions, **options)

    def ours_loss_every_position(model, x, y, positions):
        return model.loss(x, y, **options)

    # name -> (model, loss, batches)
    runs = {"ours full": (ours_full, ours_loss, padded),
            "ours full, head at every position": (ours_full, ours_loss_every_position, padded),
            "transformers full": (theirs(False), hf_loss, padded),
            "ours LoRA": (ours_lora, ours_loss, padded),
            "ours LoRA, head at every position": (ours_lora, ours_loss_every_position, padded),
            "transformers + peft LoRA": (theirs(True), hf_loss, padded),
            "ours full, packed (causal, no mask)": (ours_full, ours_loss, packed)}
    pad = tokenizer.pad_id
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    warmup = args.warmup_rounds if args.warmup_rounds is not None else int(device.type == "cuda")
    for r in range(-warmup, args.rounds):  # each round on the next batches (lengths and assistant shares vary)
        for name, (model, loss, batches) in runs.items():
            rate = tokens_per_s(loss, model, batches, args.steps, pad if batches is padded else None,
                                first=r * (args.steps + 1), device=device)
            if r >= 0:
                results[name].append(rate)
    # With one thread the CPU time is the step's own; wall-clock time also counts the time other
    # jobs on a shared machine hold the core, so the ratios are taken on CPU time.
    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    med = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    print("| run | tokens/s, wall clock | tokens/s, CPU time |\n|---|---:|---:|")
    for name in med:
        print(f"| {name} | {wall[name]:,.0f} | {med[name]:,.0f} |")
    print(f"wall clock: full {wall['ours full'] / wall['transformers full']:.2f}x, "
          f"LoRA {wall['ours LoRA'] / wall['transformers + peft LoRA']:.2f}x; CPU time:")
    print(f"full: ours / transformers = {med['ours full'] / med['transformers full']:.2f}x "
          f"(head at every position {med['ours full, head at every position'] / med['transformers full']:.2f}x); "
          f"LoRA: ours / transformers + peft = {med['ours LoRA'] / med['transformers + peft LoRA']:.2f}x "
          f"(head at every position {med['ours LoRA, head at every position'] / med['transformers + peft LoRA']:.2f}x); "
          f"packed / padded (ours full) = {med['ours full, packed (causal, no mask)'] / med['ours full']:.2f}x")


if __name__ == "__main__":
    main()
