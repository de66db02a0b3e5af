#!/usr/bin/env bash
# Fetch, on the machine WITH internet (repo root), the wheels the offline GPU machine lacks, into .whl/ (git-ignored
# through .git/info/exclude), for Python 3.12 / x86-64 as /work/.library/device/README.md documents.
#
#   bash benchmarks/gpu/fetch_wheels.sh issue7   # 1 GPU: bitsandbytes, torchao, transformers, peft   (~61 MB)
#   bash benchmarks/gpu/fetch_wheels.sh issue8   # 2 GPUs: deepspeed (+hjson, pydantic), torchao, transformers, peft
#   bash benchmarks/gpu/fetch_wheels.sh qlora    # 2 GPUs, QLoRA under DDP: bitsandbytes, torchao, transformers, peft
#   bash benchmarks/gpu/fetch_wheels.sh all      # everything at once (~33 MB): bitsandbytes shrunk to its CUDA 13.0 +
#                                                # CPU libraries, torchao, transformers, tokenizers, safetensors, peft,
#                                                # trl, liger-kernel, datasets (+dill, multiprocess), gguf, deepspeed
#                                                # (+hjson, pydantic), huggingface-hub. Source benchmarks/gpu/device_env.sh
#                                                # on the GPU machine to install them.
#
# What travels (working tree ~1.5 MB + carried .whl) must stay under 64 MiB: bitsandbytes alone is 43 MB, so the
# DeepSpeed set and the bitsandbytes set are separate calls. The GPU image already has torch 2.11, accelerate 1.15,
# peft, numpy, safetensors, tokenizers, huggingface_hub, pyarrow, psutil, msgpack, ninja, py-cpuinfo, einops
# (KINDS.md); transformers there is 5.17, this project is tested with 5.23, hence the wheel. datasets / evaluate
# are not imported by these scripts (synthetic data) and are left out to save room.
set -euo pipefail
set_name=${1:-issue7}
mkdir -p .git/info && touch .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
download() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$@"
}
common=(torchao==0.18.0 transformers==5.23.0 peft==0.21.2)
case "$set_name" in
  issue7|qlora) download bitsandbytes==0.50.2 "${common[@]}" ;;
  issue8)
    download "${common[@]}" hjson pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection
    # DeepSpeed ships only a source archive: build a pure-Python wheel here (ops are JIT-compiled on the GPU).
    tmp=$(mktemp -d)
    python3 -m pip download --no-deps --no-binary=:all: deepspeed==0.18.2 -d "$tmp"
    DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-0.18.2.tar.gz
    rm -rf "$tmp" ;;
  all)
    download bitsandbytes==0.50.2 "${common[@]}" transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 \
      trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" gguf==0.19.0 hjson \
      pydantic pydantic-core annotated-types typing-inspection huggingface-hub==2.4.0
    rm -f .whl/transformers-5.23.0-*.whl
    # Keep only bitsandbytes' CUDA 13.0 and CPU libraries (43 MB -> 4 MB): the GPU image's torch is built for CUDA 13.
    tmp=$(mktemp -d)
    (cd "$tmp" && unzip -q "$OLDPWD"/.whl/bitsandbytes-*.whl && rm -f "$OLDPWD"/.whl/bitsandbytes-*.whl \
      && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*_cpu*' -delete \
      && python3 -c "import glob; r=glob.glob('bitsandbytes-*.dist-info/RECORD')[0]; l=[x for x in open(r) if not ('libbitsandbytes_' in x and '.so,' in x and 'cuda130' not in x and '_cpu' not in x)]; open(r,'w').writelines(l)" \
      && zip -qr "$OLDPWD"/.whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl .)
    rm -rf "$tmp"
    tmp=$(mktemp -d)
    python3 -m pip download --no-deps --no-binary=:all: deepspeed==0.19.8 -d "$tmp"
    DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-0.19.8.tar.gz
    rm -rf "$tmp" ;;
  *) echo "unknown set $set_name (issue7, issue8, qlora, all)"; exit 2 ;;
esac
du -sh .whl && ls .whl
