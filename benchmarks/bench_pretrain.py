"""Pre-training benchmarks (issue 5), side by side in one run:

(a) architecture: validation bits per byte after the same wall-clock budget on this CPU for our
    Llama-style model (RMSNorm, RoPE, SwiGLU) and the GPT-2-style baseline (model.arch = "gpt2":
    LayerNorm, learned positions, GELU MLP), same shape, data, tokenizer, optimizer and loop
    (`lmforge pretrain --preset tiny --time-budget B`, both at once, one thread each).
    Target: >= 5% lower bpb.
(b) speed: training tokens/s of our Transformer vs transformers' LlamaForCausalLM of the same
    shape in the same loop (forward, cross-entropy, backward, clip, AdamW), rounds interleaved so
    the shared CPU's load hits both alike; ours as the trainer sets it up by default and with
    train.compile. Target: >= 1.3x.

    python benchmarks/bench_pretrain.py [--budget 10m] [--skip-arch] [--skip-speed]

The data is the built-in corpus prepared with the tiny preset's tokenizer into benchmarks/_work/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WORK = Path(__file__).resolve().parent / "_work"


def shards_dir() -> Path:
    from lmforge.config import load_config
    from lmforge.data.prepare import prepare

    out = WORK / "shards"
    if not (out / "manifest.json").is_file():
        prepare(load_config(preset="tiny"), out, progress=False)
    return out


def run_archs(archs: list[str], budget: str, data: Path) -> dict:
    """Train each architecture for the same wall-clock budget, all at once, one thread each.

    Running them side by side (rather than one after the other) gives both the same share of a
    CPU that other jobs may be loading unevenly over time.
    """
    import subprocess
    import sys

    from lmforge import accounting
    from lmforge.config import load_config

    sets = ["train.max_steps=100000", "train.eval_every=100000", "train.checkpoint_every=100000",
            "train.sample_every=0", "train.eval_batches=40", "train.tensorboard=false", "train.device=cpu"]
    procs = {}
    for arch in archs:
        run_dir = WORK / f"run_{arch}"
        shutil.rmtree(run_dir, ignore_errors=True)
        args = [sys.executable, "-m", "lmforge", "pretrain", "--data", str(data), "--out", str(run_dir),
                "--preset", "tiny", "--time-budget", budget]
        for item in (f"model.arch={arch}", *sets):
            args += ["--set", item]
        procs[arch] = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for arch, proc in procs.items():
        output = proc.communicate()[0]
        if proc.returncode:
            raise SystemExit(f"{arch} run failed:\n{output}")
        records = [json.loads(line) for line in (WORK / f"run_{arch}" / "metrics.jsonl").open()]
        train = [r for r in records if "loss" in r and "event" not in r]
        val = [r for r in records if "val_bpb" in r][-1]
        cfg = load_config(preset="tiny", overrides=[f"model.arch={arch}"])
        results[arch] = {"arch": arch, "params": accounting.param_counts(cfg.model).total,
                         "steps": train[-1]["step"], "tokens": train[-1]["tokens"],
                         "val_loss": val["val_loss"], "val_bpb": val["val_bpb"],
                         "seconds": train[-1]["elapsed_s"]}
    return results


def hf_llama_like(cfg):
    """transformers' LlamaForCausalLM with exactly our model's shape and initialisation scale."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_seq_len,
                         rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
                         tie_word_embeddings=m.tie_embeddings, attention_bias=False,
                         initializer_range=m.init_std)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def tokens_per_s(loss_fn, model, batches, steps: int) -> float:
    """The same loop for both models: forward + loss, backward, clip, AdamW step (fused: what
    `lmforge pretrain` and transformers' Trainer both use by default)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    model.train()
    start = None
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            start = time.perf_counter()
        x, y = batches[i % len(batches)]
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batches[0][0].numel() / (time.perf_counter() - start)


def hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def run_speed(rounds: int, steps: int, preset_overrides: list[str]) -> dict:
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from lmforge.train.loop import prepare_for_training
    from lmforge.train.pretrain import loss_options

    cfg = load_config(preset="tiny", overrides=preset_overrides)
    torch.manual_seed(0)
    T, B = cfg.model.max_seq_len, cfg.train.batch_size
    data = torch.randint(0, cfg.model.vocab_size, (4, B, T + 1))
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    # Ours as `lmforge pretrain` sets it up on this CPU (the fused loss is on by default there),
    # and the same with train.compile=true (compiled in the warm-up step, outside the timing).
    cpu = torch.device("cpu")
    ours = prepare_for_training(Transformer(cfg.model), cfg.train, cpu)
    compiled_cfg = load_config(preset="tiny", overrides=[*preset_overrides, "train.compile=true"])
    ours_compiled = prepare_for_training(Transformer(cfg.model), compiled_cfg.train, cpu)
    ours_compiled.load_state_dict(ours.state_dict())
    # the loss each is trained with, as the pre-training objective passes it (fused / compiled head)
    options = loss_options(ours, cfg.train, cpu)
    compiled_options = loss_options(ours_compiled, compiled_cfg.train, cpu)

    def ours_loss(model, x, y):
        return model.loss(x, y, **(compiled_options if model is ours_compiled else options))

    theirs = hf_llama_like(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    results = {"ours": [], "ours_compiled": [], "transformers": []}
    for _ in range(rounds):
        results["ours"].append(tokens_per_s(ours_loss, ours, batches, steps))
        results["ours_compiled"].append(tokens_per_s(ours_loss, ours_compiled, batches, steps))
        results["transformers"].append(tokens_per_s(hf_loss, theirs, batches, steps))
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"shape": f"d_model={cfg.model.d_model} n_layers={cfg.model.n_layers} n_heads={cfg.model.n_heads} "
                     f"kv={cfg.model.kv_heads} vocab={cfg.model.vocab_size} batch {B}x{T}",
            "params_ours": n_ours, "params_transformers": n_theirs,
            "tokens_per_s": med, "rounds": results, "speedup": med["ours"] / med["transformers"],
            "speedup_compiled": med["ours_compiled"] / med["transformers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="10m",
                        help="wall-clock budget per architecture (10m: what the tiny preset is tuned for)")
    parser.add_argument("--rounds", type=int, default=9,
                        help="interleaved speed rounds; run-to-run spread on a 2-core VM is ~0.1 in the ratio")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-arch", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    report = {}
    if not args.skip_speed:
        import transformers

        for label, overrides in (("tiny", []), ("wider", ["model.d_model=256", "model.n_heads=8",
                                                          "model.n_kv_heads=4", "train.batch_size=8"])):
            speed = run_speed(args.rounds, args.steps, overrides)
            report[f"speed_{label}"] = speed
            print(f"(b) {label} [{speed['shape']}]: ours {speed['tokens_per_s']['ours']:,.0f} tok/s, "
                  f"transformers {transformers.__version__} LlamaForCausalLM "
                  f"{speed['tokens_per_s']['transformers']:,.0f} tok/s -> {speed['speedup']:.2f}x; "
                  f"with train.compile {speed['tokens_per_s']['ours_compiled']:,.0f} tok/s -> "
                  f"{speed['speedup_compiled']:.2f}x")
    if not args.skip_arch:
        data = shards_dir()
        arch = run_archs(["llama", "gpt2"], args.budget, data)
        report["arch"] = arch
        gain = 1 - arch["llama"]["val_bpb"] / arch["gpt2"]["val_bpb"]
        for a, r in arch.items():
            print(f"(a) {a}: {r['params']:,} params, {r['steps']} steps, {r['tokens']:,} tokens in "
                  f"{r['seconds']:.0f}s -> val_loss {r['val_loss']:.4f}, val_bpb {r['val_bpb']:.4f}")
        print(f"(a) llama bpb is {100 * gain:.1f}% lower than gpt2 after the same {args.budget}")
    parts = "_".join(sorted({k.split("_")[0] for k in report})) or "none"
    (WORK / f"bench_pretrain_{parts}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
