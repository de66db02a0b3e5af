#!/usr/bin/env bash
# Issue 8 on a 2-GPU machine, from the repository root: distill_prune_qat.py under DDP, FSDP2 and DeepSpeed ZeRO-3,
# with a full student and with a LoRA student (--peft). One JSON per run comes back from $OUT
# (accelerate_<type>[_peft].json) with a combined log run_2gpu.log.
#
#   bash examples/accelerate/run_2gpu.sh                      # 3 configs x 2 students
#   CONFIGS="ddp fsdp2" bash examples/accelerate/run_2gpu.sh  # a subset (a device command has 10 minutes)
#   STUDENTS="full" EXTRA="--max_steps 30" bash examples/accelerate/run_2gpu.sh
#
# Wheels carried in .whl/ (benchmarks/gpu/fetch_wheels.sh issue8) are installed into /tmp/site first.
set -uo pipefail
# NVLink multicast stays off on the shared GPU hosts (also inherited by every process accelerate starts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-examples/accelerate/results}
export OUT
mkdir -p "$OUT"
LOG="$OUT/run_2gpu.log"
{ date -u; nvidia-smi || echo "nvidia-smi: not available"; nvidia-smi topo -m 2>/dev/null; } 2>&1 | tee "$LOG"
status=0
for config in ${CONFIGS:-ddp fsdp2 deepspeed_zero3}; do
  for student in ${STUDENTS:-full peft}; do
    flag=""; [ "$student" = peft ] && flag="--peft"
    echo "=== $config $student" | tee -a "$LOG"
    start=$(date +%s)
    timeout "${LAUNCH_TIMEOUT:-300}" python3 -m accelerate.commands.launch \
      --config_file "examples/accelerate/$config.yaml" examples/accelerate/distill_prune_qat.py \
      --output_dir "/tmp/dpq_${config}_${student}" --results_json "/tmp/dpq_${config}_${student}.json" \
      $flag ${EXTRA:-} 2>&1 | grep -v -E "Loading weights|Writing model shards|_pytree.py|^\{'loss'" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $config $student exit $rc in $(( $(date +%s) - start )) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
  done
done
exit $status
