#!/usr/bin/env bash
# Issue 12 in one device command on a 2-GPU machine (nvidia-h200-x2), from the repository root, within BUDGET_S
# seconds (default 540 = 9 min). Steps run in priority order; each prints its time estimate, runs under a hard
# timeout, and is skipped (and recorded as skipped) when its estimate no longer fits what is left of the budget.
#
#   bash benchmarks/gpu/run_issue12.sh                 # 2 GPUs
#   NGPU=4 BUDGET_S=570 bash benchmarks/gpu/run_issue12.sh   # 4 GPUs: also N=4 scaling, matrix on 4
#   bash benchmarks/gpu/run_issue12.sh --smoke         # CPU processes, tiny models: checks the whole schedule
#
#  1. matrix     examples/accelerate/run_2gpu.sh: DDP / FSDP2 / ZeRO-3 x full / LoRA student (19M / 50M Llamas,
#                30 steps, QAT from step 15), two launches at a time               (~150 s)
#  2. one_gpu    side by side: GPU 0 scaling.py N=1 plain then FSDP2 N=1 (1.1B student / 3B teacher, combined run);
#                GPU 1 qlora_memory.py 7B NF4 vs bf16 LoRA, batch 1, 2, 4 x 2048    (~85 s)
#  3. scaling    scaling.py under DDP, FSDP2, ZeRO-3 on N GPUs (N = 2, and 4 with NGPU=4)   (~40 s per run)
#  4. bigpair    scaling.py --presharded: 32B-shaped bf16 teacher + 7B-shaped AdamW student, FSDP2 on NGPU
#                                                                                   (~80 s)
#  5. qlora_ddp  qlora_memory.py --ddp: 7B QLoRA under DDP with the Trainer on NGPU    (~60 s)
#  6. summaries  scaling.py --summarize, summarize_results.py                       (~5 s)
#
# Everything lands in $OUT (default benchmarks/gpu/results): run_issue12.log, one log per step, run_issue12.json
# (steps: estimate, seconds, status), scaling_*.json + scaling.json, qlora_memory.json, qlora_ddp.json,
# accelerate_*_n<N>.json + accelerate_matrix.json.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-benchmarks/gpu/results}
export OUT
mkdir -p "$OUT"
LOG="$OUT/run_issue12.log"
STEPS_TSV="$OUT/run_issue12.steps.tsv"
: > "$STEPS_TSV"
BUDGET_S=${BUDGET_S:-540}
if [ -n "$SMOKE" ]; then
  NGPU=${NGPU:-2}
  BUDGET_S=${BUDGET_S_SMOKE:-1800}
else
  NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
fi
SECONDS=0
{
  date -u
  echo "budget ${BUDGET_S} s, NGPU ${NGPU}${SMOKE:+, smoke (CPU)}"
  nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: n/a"
  python3 -c 'import torch, transformers, accelerate, peft; print("torch", torch.__version__, "transformers",
transformers.__version__, "accelerate", accelerate.__version__, "peft", peft.__version__)'
  python3 -c 'import deepspeed, bitsandbytes, torchao; print("deepspeed", deepspeed.__version__, "bitsandbytes",
bitsandbytes.__version__, "torchao", torchao.__version__)' 2>&1 | tail -1
  echo "plan (estimates on 2 x H200, priority order): matrix 150 s, one_gpu 90 s, scaling_n2 120 s, bigpair 80 s," \
    "qlora_ddp 60 s, summaries 5 s = 505 s"
} 2>&1 | tee "$LOG"

write_steps_json() {
  python3 - "$STEPS_TSV" "$OUT/run_issue12.json" "$BUDGET_S" "$SECONDS" <<'PY'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [dict(name=r[0], estimate_s=int(r[1]), status=r[2], seconds=int(r[3]), detail=r[4]) for r in rows]
json.dump({"budget_s": int(sys.argv[3]), "elapsed_s": int(sys.argv[4]), "steps": steps}, open(sys.argv[2], "w"), indent=1)
PY
}

# step NAME ESTIMATE_S TIMEOUT_S COMMAND...: run COMMAND if ESTIMATE_S still fits the budget.
step() {
  local name=$1 estimate=$2 limit=$3
  shift 3
  local left=$((BUDGET_S - SECONDS))
  if [ "$estimate" -gt "$left" ]; then
    echo "=== SKIP $name: estimate ${estimate} s > ${left} s left of the budget" | tee -a "$LOG"
    printf '%s\t%s\tskipped\t0\tbudget (%s s left)\n' "$name" "$estimate" "$left" >> "$STEPS_TSV"
    write_steps_json
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: estimate ${estimate} s, timeout ${limit} s (${left} s left) at $(date -u +%T)" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] && status=timeout
  grep -v -E "_pytree.py|Loading weights|Writing model shards|^\{'loss'|it/s\]$|UserWarning|warnings.warn" \
    "$OUT/$name.log" | tail -n "${TAIL_LINES:-40}" | tee -a "$LOG"
  echo "=== $name: $status (exit $rc) in $((SECONDS - start)) s" | tee -a "$LOG"
  printf '%s\t%s\t%s\t%s\texit %s\n' "$name" "$estimate" "$status" "$((SECONDS - start))" "$rc" >> "$STEPS_TSV"
  write_steps_json
}

# acc MODE NPROC PORT SCRIPT ARGS...: accelerate launch under ddp / fsdp2 / zero3 (CPU processes with --smoke).
acc() {
  local mode=$1 n=$2 port=$3
  shift 3
  local config=ddp script=("$@") envs=() extra=()
  case $mode in fsdp2) config=fsdp2 ;; zero3) config=deepspeed_zero3 ;; esac
  if [ -n "$SMOKE" ]; then
    extra=(--mixed_precision no --dynamo_backend no --num_machines 1)
    case $mode in
      zero3) envs=(DS_ACCELERATOR=cpu OMP_NUM_THREADS=1) ;;
      fsdp2) envs=(ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1); script=(tests/scripts/fsdp2_cpu.py "${script[@]}") ;;
      *) envs=(ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1) ;;
    esac
  fi
  env "${envs[@]}" python3 -m accelerate.commands.launch --config_file "examples/accelerate/$config.yaml" \
    --num_processes "$n" --main_process_port "$port" "${extra[@]}" "${script[@]}"
}
export -f acc

S=""
[ -n "$SMOKE" ] && S="--smoke"
export S SMOKE NGPU

# 1. correctness matrix (the issue's first table)
if [ -n "$SMOKE" ]; then
  step matrix 150 400 env SMOKE=1 MAX_STEPS=4 CONFIGS="ddp deepspeed_zero3" STUDENTS="full" NPROC=2 LAUNCH_TIMEOUT=300 \
    bash examples/accelerate/run_2gpu.sh
else
  step matrix 150 230 env NPROC="$NGPU" JOBS=2 MAX_STEPS=30 LAUNCH_TIMEOUT=150 EXTRA="--size small" \
    bash examples/accelerate/run_2gpu.sh
fi

# 2. one GPU each: N=1 throughput baselines on GPU 0 while the 7B QLoRA memory benchmark runs on GPU 1
one_gpu() {
  (
    export CUDA_VISIBLE_DEVICES=0
    python3 benchmarks/gpu/scaling.py $S --tag plain_n1 --budget-s 45
    acc fsdp2 1 29710 benchmarks/gpu/scaling.py $S --tag fsdp2_n1 --budget-s 45
  ) > "$OUT/one_gpu_scaling.log" 2>&1 &
  local scaling=$!
  if [ -n "$SMOKE" ]; then
    python3 benchmarks/gpu/qlora_memory.py --smoke --batch-sizes 1 --steps 1 --rounds 0
  else
    CUDA_VISIBLE_DEVICES=$((NGPU > 1 ? 1 : 0)) python3 benchmarks/gpu/qlora_memory.py --budget-s 80
  fi
  local rc=$?
  wait "$scaling" || rc=1
  echo "--- one_gpu_scaling.log"
  grep -E "^## |wrote|Error|error:" "$OUT/one_gpu_scaling.log" | grep -v _pytree
  return $rc
}
export -f one_gpu
step one_gpu 90 130 bash -c one_gpu

# 3. N GPUs: DDP, FSDP2, ZeRO-3 (throughput, memory per rank, the teacher's share)
scaling_n() {
  local n=$1 rc=0
  local visible
  visible=$(seq -s, 0 $((n - 1)))
  export CUDA_VISIBLE_DEVICES=$visible
  [ -n "$SMOKE" ] && unset CUDA_VISIBLE_DEVICES
  acc ddp "$n" 29720 benchmarks/gpu/scaling.py $S --tag "ddp_n$n" --budget-s 40 || rc=1
  acc fsdp2 "$n" 29721 benchmarks/gpu/scaling.py $S --tag "fsdp2_n$n" --budget-s 40 || rc=1
  acc zero3 "$n" 29722 benchmarks/gpu/scaling.py $S --tag "zero3_n$n" --budget-s 40 || rc=1
  return $rc
}
export -f scaling_n
for n in ${SCALING_NS:-$( [ "$NGPU" -ge 4 ] && echo "2 4" || echo "$NGPU")}; do
  [ "$n" -ge 2 ] || continue
  step "scaling_n$n" 120 170 bash -c "scaling_n $n"
done

# 4. a pair that does not fit one GPU under DDP, trained under FSDP2 on NGPU (built as shards, never whole)
if [ -n "$SMOKE" ]; then
  step bigpair 60 300 bash -c 'acc fsdp2 2 29730 benchmarks/gpu/scaling.py --smoke --presharded --no-pruning --no-qat --tag bigpair'
else
  step bigpair 80 130 bash -c "acc fsdp2 $NGPU 29730 benchmarks/gpu/scaling.py --student 7b --teacher 32b --presharded \
    --no-pruning --no-qat --batch-size 1 --seq-len 1024 --steps 5 --warmup 2 --budget-s 60 --tag bigpair_7b_32b_n$NGPU"
fi

# 5. QLoRA 7B under DDP with the Trainer
if [ -n "$SMOKE" ]; then
  step qlora_ddp 60 300 bash -c 'acc ddp 2 29740 benchmarks/gpu/qlora_memory.py --smoke --ddp --steps 2'
else
  step qlora_ddp 60 90 bash -c "acc ddp $NGPU 29740 benchmarks/gpu/qlora_memory.py --ddp --batch-size 1 --steps 4"
fi

# 6. tables
step summaries 5 30 bash -c 'python3 benchmarks/gpu/scaling.py --summarize; python3 examples/accelerate/summarize_results.py "$OUT"'
echo "=== done in ${SECONDS} s of ${BUDGET_S} s" | tee -a "$LOG"
write_steps_json
! grep -q -P "\t(failed|timeout)\t" "$STEPS_TSV"
