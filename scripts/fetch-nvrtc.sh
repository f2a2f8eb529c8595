#!/usr/bin/env bash
# Installs NVRTC 13.0 from the PyPI wheel nvidia-cuda-nvrtc==13.0.88 (the GPU machines run
# driver 580 = CUDA 13.0; a newer NVRTC emits PTX that driver may refuse) into the cache
# folder, and prints the folder holding libnvrtc.so.13. No GPU is needed: it compiles kernels.
set -euo pipefail
cache="${AWQ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/awq-pipeline}"
target="$cache/nvrtc-13.0.88"
lib="$target/nvidia/cu13/lib"
if [ ! -f "$lib/libnvrtc.so.13" ]; then
  echo "fetch-nvrtc: installing nvidia-cuda-nvrtc==13.0.88 into $target" >&2
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" nvidia-cuda-nvrtc==13.0.88 >&2
fi
echo "$lib"
