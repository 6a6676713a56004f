#!/usr/bin/env bash
# Stress check for distributed teardown (issue: ranks aborting at exit, "terminate called without
# an active exception"). Not part of CI: it takes tens of minutes on 2 cores.
#
#   scripts/stress_distributed.sh tests N     the distributed test modules N times, each a fresh pytest
#   scripts/stress_distributed.sh cli N       `torchrun -m lmforge pretrain` and the `lmforge` console
#                                              script under torchrun, for ddp, fsdp, pipeline and
#                                              fsdp+tp, N times each
# Prints one line per run and a count at the end; exits 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-tests}; n=${2:-20}
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ok=0; bad=0; start=$(date +%s)
record() {  # record NAME RC LOG
  if [ "$2" -eq 0 ]; then ok=$((ok + 1)); echo "ok   $1"; else
    bad=$((bad + 1)); echo "FAIL $1 (rc=$2)"; grep -E "terminate called|SIGABRT|Error" "$3" | head -5; fi
}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if [ "$mode" = tests ]; then
  for i in $(seq "$n"); do
    python -m pytest -q -x -p no:cacheprovider tests/test_distributed.py tests/test_distributed_loop.py \
      > "$work/log" 2>&1
    record "tests round $i: $(tail -1 "$work/log")" $? "$work/log"
  done
elif [ "$mode" = cli ]; then
  python - "$work/shards" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from train_fixtures import make_shards
make_shards(Path(sys.argv[1]).parent)
PY
  tiny=(--set model.vocab_size=300 --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=2
        --set model.n_kv_heads=2 --set model.max_seq_len=32 --set train.batch_size=4
        --set train.max_steps=8 --set train.checkpoint_every=4 --set train.eval_every=4
        --set train.eval_batches=2 --set train.tensorboard=false --set train.device=cpu)
  script="$(python -c "import sysconfig; print(sysconfig.get_path('scripts'))")/lmforge"  # not a shell shim
  for i in $(seq "$n"); do
    for strategy in ddp fsdp pipeline fsdp+tp; do
      for how in module script; do
        if [ "$how" = module ]; then launch=(-m lmforge); else launch=("$script"); fi
        rm -rf "$work/out"
        timeout 300 python -m torch.distributed.run --standalone --nproc_per_node=2 "${launch[@]}" \
          pretrain --data "$work/shards" --out "$work/out" "${tiny[@]}" --set "train.parallel=$strategy" \
          > "$work/log" 2>&1
        record "$strategy via $how, round $i" $? "$work/log"
      done
    done
  done
else
  echo "usage: $0 tests|cli [N]" >&2; exit 2
fi
echo "$ok passed, $bad failed in $(( $(date +%s) - start ))s"
[ "$bad" -eq 0 ]
