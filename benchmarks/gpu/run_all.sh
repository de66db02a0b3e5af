#!/usr/bin/env bash
# Issue 7's four GPU measurements in one command, on the GPU machine, from the repository root:
#
#   bash benchmarks/gpu/run_all.sh            # all four (GPU)
#   BENCHES="qlora_memory nf4_latency" bash benchmarks/gpu/run_all.sh   # a subset (each command has 10 minutes)
#   bash benchmarks/gpu/run_all.sh --smoke    # tiny models on CPU (what CI-like machines can run)
#
# Wheels carried in .whl/ (see fetch_wheels.sh) are installed into /tmp/site first. JSON results go to $OUT (the
# device tool's folder that comes back) or to benchmarks/gpu/results/, with one combined log run_all.log.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The wheels are for the GPU image's Python 3.12; elsewhere (e.g. a --smoke run on a dev box) they are left alone.
if compgen -G ".whl/*.whl" > /dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # hf_compress from this checkout
OUT=${OUT:-benchmarks/gpu/results}
mkdir -p "$OUT"
LOG="$OUT/run_all.log"
{
  date -u
  nvidia-smi || echo "nvidia-smi: not available (no NVIDIA GPU)"
  python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "torchao", "hf_compress"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {module.__file__}")
    except Exception as err:  # noqa: BLE001
        print(f"{name}: NOT importable ({type(err).__name__}: {err})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} 2>&1 | tee "$LOG"
status=0
for bench in ${BENCHES:-qlora_memory sparse_2to4_speed nf4_latency distill_step_cost}; do
  echo "=== $bench $*" | tee -a "$LOG"
  start=$(date +%s)
  python3 "benchmarks/gpu/$bench.py" "$@" 2>&1 | grep -v -E "Loading weights|Writing model shards|_pytree.py" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $bench exit $rc in $(( $(date +%s) - start )) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
