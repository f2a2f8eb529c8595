#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, runs every GPU test for real (a skip is a
# failure here), the CPU kernels' tests on its host (AMX required where the host has it),
# SmolLM2-135M AWQ perplexity on the GPU against the CPU, and the W4A16 kernel benchmark
# against cuBLAS f16; prints a short table last. Exit status: 0 when every required
# check passed.
#
#   scripts/gpu-check.sh                       # builds with cargo; fetches and quantizes the model
#   AWQ_PREBUILT=DIR scripts/gpu-check.sh      # a bare GPU machine: binaries, model and data from
#                                              # DIR, made by scripts/gpu-bundle.sh elsewhere
#
# Logs and JSON reports go to $OUT (default target/gpu-check). AWQ_GPU_MODEL overrides the AWQ
# checkpoint scored end to end; AWQ_GPU_WINDOWS (default 40) the windows compared CPU vs GPU.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="${OUT:-$root/target/gpu-check}"
mkdir -p "$out"
windows="${AWQ_GPU_WINDOWS:-40}"
status=0
declare -a rows=()
row() { rows+=("| $1 | $2 | $3 |"); }
fail() { status=1; row "$1" "FAIL" "$2"; }

# --- Libraries -------------------------------------------------------------------------------
# cudarc loads libnvrtc, libcublas and libnccl by name at run time. CUDA images keep them in
# the toolkit or in Python wheels; the NCCL wheel ships only libnccl.so.2, a name cudarc does
# not try, so a link named libnccl.so is made beside the logs.
links="$out/lib"
mkdir -p "$links"
add_lib_dir() { case ":${LD_LIBRARY_PATH:-}:" in *":$1:"*) ;; *) export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac; }
find_lib() {
  find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/local/lib /opt /usr/lib \
    -maxdepth 10 -name "$1" 2>/dev/null | head -n 1
}
for name in 'libnvrtc.so.13*' 'libcublas.so.13*' 'libnccl.so.2*'; do
  found=$(find_lib "$name")
  if [ -n "$found" ]; then
    add_lib_dir "$(dirname "$found")"
    echo "gpu-check: $name -> $found"
  else
    echo "gpu-check: $name not found" >&2
  fi
done
nccl=$(find_lib 'libnccl.so.2*')
[ -n "$nccl" ] && ln -sf "$nccl" "$links/libnccl.so" && add_lib_dir "$links"

gpu_name=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
if [ -z "$gpu_name" ]; then
  echo "gpu-check: nvidia-smi sees no GPU; this script needs one" >&2
  exit 1
fi
echo "gpu-check: $gpu_name"

# --- Binaries, model and data -----------------------------------------------------------------
if [ -z "${AWQ_PREBUILT:-}" ]; then
  echo "gpu-check: building and bundling (scripts/gpu-bundle.sh, log in $out/build.log)"
  scripts/gpu-bundle.sh "$out/bundle" ${AWQ_GPU_MODEL:+"$AWQ_GPU_MODEL"} >"$out/build.log" 2>&1 ||
    { tail -n 30 "$out/build.log"; exit 1; }
  AWQ_PREBUILT="$out/bundle"
fi
bin="$AWQ_PREBUILT/bin"
export AWQ_WORKSPACE_DIR="$AWQ_PREBUILT/repo"
model="${AWQ_GPU_MODEL:-$AWQ_PREBUILT/model}"
export AWQ_REQUIRE_GPU=1 AWQ_REQUIRE_NVRTC=1
wiki="$AWQ_WORKSPACE_DIR/data/wiki.test.raw"

# --- Tests ------------------------------------------------------------------------------------
run_test() { # name binary [env...]
  local name=$1 binary=$2
  shift 2
  local t0=$SECONDS log="$out/test-$binary.log"
  if timeout 300 env "$@" "$bin/$binary" --test-threads=1 --nocapture >"$log" 2>&1 &&
    ! grep -q '^test result: ok. 0 passed' "$log"; then
    local worst
    worst=$(grep -o 'relative error [0-9.e+-]*' "$log" | awk '{print $3}' | sort -g | tail -n 1)
    row "$name" "pass" "$(grep -o '[0-9]* passed' "$log" | tail -n 1), $((SECONDS - t0)) s${worst:+, worst relative error $worst}"
  else
    # The first failure: the panicking test and its message (the line after "panicked at"),
    # or a binary that ran no test at all.
    fail "$name" "$(grep -m1 -A1 'panicked at' "$log" | sed -E "s/^thread '([^']*)'.*/\1:/" | tr '|\n' '/ ' ||
      true)$(grep -q '^test result: ok. 0 passed' "$log" && echo 'no test ran')"
  fi
}
run_test "NVRTC compile check (sm_90)" compile_check
run_test "kernels vs CPU twins, tiny models" cuda_backend
run_test "NCCL collectives" nccl
# The host's CPU kernels against their scalar twins; where the host has AMX (Intel Xeons of
# these machines do), the AMX-BF16 kernel must run, not skip.
if grep -qw amx_bf16 /proc/cpuinfo; then
  run_test "CPU kernels vs scalar twins, AMX-BF16 required (host CPU)" tp_runtime_lib AWQ_REQUIRE_AMX=1
else
  run_test "CPU kernels vs scalar twins (host CPU, no AMX)" tp_runtime_lib
fi
# Two ranks on one GPU needs an experimental NCCL switch; recorded, not required.
if timeout 60 env NCCL_MULTI_RANK_GPU_ENABLE=1 "$bin/nccl" nccl_two_ranks --nocapture >"$out/nccl-two-ranks.log" 2>&1; then
  row "NCCL two ranks on one GPU (optional)" "pass" "NCCL_MULTI_RANK_GPU_ENABLE=1"
else
  row "NCCL two ranks on one GPU (optional)" "not supported" "$(grep -m1 -oE 'NCCL [a-z -]+: [A-Za-z_]+' "$out/nccl-two-ranks.log" || echo see log)"
fi

# --- End to end -------------------------------------------------------------------------------
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
eval_on() { # backend json [args...]
  local backend=$1 json=$2
  shift 2
  timeout 300 "$bin/awq" eval "$model" --data "$wiki" --ctx 512 --protocol full --backend "$backend" --json "$json" "$@" \
    >"$json.log" 2>&1
}
if eval_on cuda "$out/eval-cuda.json" --windows "$windows" && eval_on cpu "$out/eval-cpu.json" --windows "$windows"; then
  ppl_cuda=$(json_field "$out/eval-cuda.json" ppl)
  ppl_cpu=$(json_field "$out/eval-cpu.json" ppl)
  tps_cuda=$(json_field "$out/eval-cuda.json" tokens_per_second)
  tps_cpu=$(json_field "$out/eval-cpu.json" tokens_per_second)
  rel=$(python3 -c "print(abs($ppl_cuda - $ppl_cpu) / $ppl_cpu)")
  detail=$(printf 'PPL GPU %.4f vs CPU %.4f (rel %.1e, bound 1e-3); %.0f vs %.0f tokens/s' \
    "$ppl_cuda" "$ppl_cpu" "$rel" "$tps_cuda" "$tps_cpu")
  if python3 -c "import sys; sys.exit(0 if $rel <= 1e-3 else 1)"; then
    row "SmolLM2 AWQ, $windows windows of 512" "pass" "$detail"
  else
    fail "SmolLM2 AWQ, $windows windows of 512" "$detail"
  fi
else
  fail "SmolLM2 AWQ, $windows windows of 512" "$(tail -n 2 "$out"/eval-*.json.log | tr '\n' ' ')"
fi
if eval_on cuda "$out/eval-cuda-full.json" --batch 8; then
  row "SmolLM2 AWQ, whole test set on GPU" "done" "$(printf 'PPL %.4f, %.0f tokens/s, %d windows' \
    "$(json_field "$out/eval-cuda-full.json" ppl)" "$(json_field "$out/eval-cuda-full.json" tokens_per_second)" \
    "$(json_field "$out/eval-cuda-full.json" windows)")"
else
  fail "SmolLM2 AWQ, whole test set on GPU" "$(tail -n 1 "$out/eval-cuda-full.json.log")"
fi

# --- Benchmark --------------------------------------------------------------------------------
if timeout 300 "$bin/awq" bench kernels --json "$out/bench-kernels.json" >"$out/bench-kernels.md" 2>"$out/bench-kernels.log"; then
  row "W4A16 vs cuBLAS f16 benchmark" "done" "table below"
else
  fail "W4A16 vs cuBLAS f16 benchmark" "$(tail -n 1 "$out/bench-kernels.log")"
fi

echo
echo "GPU check on $gpu_name ($(date -u +%FT%TZ)); logs in $out"
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
[ -s "$out/bench-kernels.md" ] && cat "$out/bench-kernels.md"
exit $status
