#!/usr/bin/env bash
# run_2gpu.sh on 4 GPUs of one host: DDP, FSDP2 and DeepSpeed ZeRO-3, full and LoRA students (see run_2gpu.sh).
#
#   bash examples/accelerate/run_4gpu.sh            # JSON in $OUT: accelerate_<type>[_peft]_n4.json
exec env NPROC="${NPROC:-4}" bash "$(dirname "$0")/run_2gpu.sh" "$@"
