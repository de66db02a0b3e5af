# Source this at the start of every command on the GPU machine (from the repository root):
#
#   source benchmarks/gpu/device_env.sh
#
# It installs the carried wheels (.whl/, see fetch_wheels.sh) into /tmp/site once per machine, unpacks the carried
# WikiText-2 copy (.gpudata/wikitext2/*.txt.gz) and, once all three carried parts of the SmolLM2 GGUF file are on the
# machine (.gg_a/part, .gg_b/part, .gg_c/part: a device call carries at most 64 MiB, the file is 98 MB), joins and
# checks them and points HF_COMPRESS_SMOLLM2_GGUF at the result so `hf_compress.smollm2_folder()` converts it.
# NVLink multicast stays off on the shared GPU hosts (inherited by every process started from here).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f /tmp/site/.installed ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# Carried paths do not stay on the machine between calls (only what a command writes elsewhere does): keep the
# data and the GGUF parts under /tmp, and point .gpudata/wikitext2 there.
mkdir -p /tmp/gpudata/wikitext2 /tmp/gg
for gz in .gpudata/wikitext2/*.txt.gz; do
  [ -f "$gz" ] && gunzip -c "$gz" > "/tmp/gpudata/wikitext2/$(basename "${gz%.gz}")"
done
[ -f .gpudata/gguf.sha256 ] && cp .gpudata/gguf.sha256 /tmp/gg/
if [ ! -d .gpudata/wikitext2 ] || [ -L .gpudata/wikitext2 ]; then
  mkdir -p .gpudata && ln -sfn /tmp/gpudata/wikitext2 .gpudata/wikitext2
elif [ ! -f .gpudata/wikitext2/train.txt ]; then
  cp /tmp/gpudata/wikitext2/*.txt .gpudata/wikitext2/ 2>/dev/null
fi
for part in a b c; do
  [ -f ".gg_$part/part" ] && cp ".gg_$part/part" "/tmp/gg/$part"
done
GGUF=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f /tmp/gg/a ] && [ -f /tmp/gg/b ] && [ -f /tmp/gg/c ]; then
  mkdir -p /tmp/smollm2 && cat /tmp/gg/a /tmp/gg/b /tmp/gg/c > "$GGUF"
  if [ -f /tmp/gg/gguf.sha256 ] && [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$(cut -d' ' -f1 /tmp/gg/gguf.sha256)" ]; then
    echo "device_env: joined GGUF has the wrong sha256; removing it" >&2
    rm -f "$GGUF"
  fi
fi
[ -f "$GGUF" ] && export HF_COMPRESS_SMOLLM2_GGUF=$GGUF
export HF_COMPRESS_CACHE=/tmp/hf_compress_cache
echo "device_env: wheels $( [ -f /tmp/site/.installed ] && echo installed || echo MISSING ), wikitext2 $(ls /tmp/gpudata/wikitext2 | tr '\n' ' '), gguf parts $(ls /tmp/gg | tr '\n' ' '), smollm2 ${HF_COMPRESS_SMOLLM2_GGUF:-not yet}"
export OUT=${OUT:-benchmarks/gpu/results}
mkdir -p "$OUT"
