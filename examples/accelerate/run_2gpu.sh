#!/usr/bin/env bash
# distill_prune_qat.py under DDP, FSDP2 and DeepSpeed ZeRO-3 on N GPUs of one host (default 2), each with a full
# student and a LoRA student (--peft), from the repository root. One JSON per run comes back in $OUT
# (accelerate_<type>[_peft]_n<N>.json), with run_<N>gpu.log, one log per launch and accelerate_matrix.json (the
# summary table, also printed).
#
#   bash examples/accelerate/run_2gpu.sh                      # 3 configs x 2 students on 2 GPUs
#   NPROC=4 bash examples/accelerate/run_2gpu.sh              # the same on 4 GPUs (run_4gpu.sh does this)
#   CONFIGS="ddp fsdp2" STUDENTS="full" bash examples/accelerate/run_2gpu.sh   # a subset
#   MAX_STEPS=60 JOBS=1 bash examples/accelerate/run_2gpu.sh  # longer runs, one launch at a time
#   SMOKE=1 MAX_STEPS=8 bash examples/accelerate/run_2gpu.sh  # CPU processes, tiny models (checks this script)
#
# JOBS (default 2) launches that many runs of a config at once (the full and the LoRA student share the GPUs; each
# gets its own port): the runs are small, so the matrix takes about 3 launch times instead of 6. MAX_STEPS (default
# 20; QAT starts half way, gradual pruning ends half way) and LAUNCH_TIMEOUT (s, default 240) bound each launch.
# EXTRA adds arguments to every launch (e.g. EXTRA="--pattern 2:4" or "--method wanda").
#
# Wheels carried in .whl/ (benchmarks/gpu/fetch_wheels.sh) are installed into /tmp/site first, if any.
set -uo pipefail
# NVLink multicast stays off on the shared GPU hosts (also inherited by every process accelerate starts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NPROC=${NPROC:-2}
JOBS=${JOBS:-2}
OUT=${OUT:-examples/accelerate/results}
export OUT
mkdir -p "$OUT"
LOG="$OUT/run_${NPROC}gpu.log"
{ date -u; nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: n/a"; } \
  2>&1 | tee "$LOG"
status=0
port=29600
launch() {  # config student port
  local config=$1 student=$2 port=$3 flag=""
  [ "$student" = peft ] && flag="--peft"
  local name="${config}_${student}_n${NPROC}" start
  local envs=() smoke=() script=(examples/accelerate/distill_prune_qat.py)
  if [ -n "${SMOKE:-}" ]; then  # CPU processes (gloo), tiny models: checks this script, not the GPUs
    smoke=(--mixed_precision no --dynamo_backend no --num_machines 1)
    script+=(--tiny)
    case $config in
      deepspeed_zero3) envs=(DS_ACCELERATOR=cpu OMP_NUM_THREADS=1) ;;
      fsdp2) envs=(ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1); script=(tests/scripts/fsdp2_cpu.py "${script[@]}") ;;
      *) envs=(ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1) ;;
    esac
  fi
  start=$(date +%s)
  env "${envs[@]}" timeout "${LAUNCH_TIMEOUT:-240}" python3 -m accelerate.commands.launch \
    --config_file "examples/accelerate/$config.yaml" --num_processes "$NPROC" --main_process_port "$port" \
    "${smoke[@]}" "${script[@]}" --max_steps "${MAX_STEPS:-20}" \
    --output_dir "/tmp/dpq_$name" --results_json "/tmp/dpq_$name.json" $flag ${EXTRA:-} \
    > "$OUT/launch_$name.log" 2>&1
  local rc=$?
  grep -E "^## |^loss |^pruning|^QAT|^\| [0-9]|^reload|^quantized|^checks|Error|FAILED" "$OUT/launch_$name.log" \
    | grep -v "_pytree" | head -40 > "/tmp/dpq_$name.summary"
  { echo "=== $config $student (N=$NPROC) exit $rc in $(( $(date +%s) - start )) s"; cat "/tmp/dpq_$name.summary"; } \
    >> "$LOG.part_$name"
  return $rc
}
for config in ${CONFIGS:-ddp fsdp2 deepspeed_zero3}; do
  pids=()
  names=()
  for student in ${STUDENTS:-full peft}; do
    port=$((port + 1))
    launch "$config" "$student" "$port" &
    pids+=($!)
    names+=("${config}_${student}_n${NPROC}")
    if [ "${#pids[@]}" -ge "$JOBS" ]; then
      for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; cat "$LOG.part_${names[$i]}" | tee -a "$LOG"; rm -f "$LOG.part_${names[$i]}"; done
      pids=(); names=()
    fi
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; cat "$LOG.part_${names[$i]}" | tee -a "$LOG"; rm -f "$LOG.part_${names[$i]}"; done
done
python3 examples/accelerate/summarize_results.py "$OUT" 2>&1 | tee -a "$LOG" || status=1
exit $status
