#!/usr/bin/env bash
# Assembles what scripts/gpu-check.sh needs on a GPU machine that has no Rust toolchain and no
# network: stripped release binaries (awq and the GPU test programs), an AWQ checkpoint of
# SmolLM2-135M, and the repository's data/ and fixtures/ (the evaluation text, the tiny models).
#
#   scripts/gpu-bundle.sh DIR [MODEL]     # MODEL: an AWQ checkpoint (default: the main job's;
#                                         # quantized here, group size 64, when it is absent)
#   ...copy DIR to the GPU machine...
#   AWQ_PREBUILT=DIR scripts/gpu-check.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=${1:?usage: scripts/gpu-bundle.sh DIR [MODEL]}
model=${2:-$root/out/smollm2-135m-awq/quantized}
target="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$dir/bin" "$dir/model" "$dir/repo"
cargo build --release -p pipeline
cp "$target/release/awq" "$dir/bin/awq"
if [ ! -f "$model/config.json" ]; then
  f32=$(scripts/fetch-model.sh)
  model="$dir/quantized"
  echo "gpu-bundle: quantizing $f32 -> $model (AWQ, group size 64)" >&2
  "$target/release/awq" quantize "$f32" --out "$model" --force --group-size 64 \
    --calib "$root/data/wikitext2-valid.txt" >&2
fi
# tp-runtime's GPU tests exist only with its `cuda` feature (without it they compile to
# binaries that run no test); its unit tests (tp_runtime_lib) hold the CPU kernels' checks
# against their scalar twins, AMX included, for the GPU machine's host CPU.
cargo test --release --no-run --message-format=json -p cuda-kernels --test compile_check \
  -p tp-runtime --features tp-runtime/cuda --lib --test cuda_backend --test nccl |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind, name = m["target"]["kind"], m["target"]["name"]
    if kind == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/" + name)
    elif kind == ["lib"] and name == "tp_runtime":
        shutil.copy(m["executable"], sys.argv[1] + "/tp_runtime_lib")
' "$dir/bin"
strip "$dir"/bin/*
[ "$model" = "$dir/model" ] || cp "$model"/*.json "$model"/*.safetensors "$dir/model/"
# The test binaries find data/ and fixtures/ through AWQ_WORKSPACE_DIR (set by gpu-check.sh).
cp -r "$root/data" "$root/fixtures" "$dir/repo/"
du -sh "$dir"/*
