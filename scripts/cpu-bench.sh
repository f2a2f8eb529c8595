#!/usr/bin/env bash
# CPU speed of every compute path this machine has (f32, bf16, amx), each against f32 in the
# same run: `awq bench quantize` and `awq bench eval` on SmolLM2-135M, then one layer of the
# Llama-2-7B-shaped search (`awq bench scale`) with each path. Prints the CPU model and its
# 16-bit features first and a summary table last; the full tables and JSON go to $OUT.
#
#   scripts/cpu-bench.sh                    # builds with cargo; SmolLM2 fetched and imported
#   AWQ_PREBUILT=DIR scripts/cpu-bench.sh   # a machine without Rust or network (the GPU
#                                           # machines' hosts): binaries, data and the AWQ
#                                           # checkpoint from scripts/gpu-bundle.sh; the f32
#                                           # model quantized is then a synthetic one at
#                                           # SmolLM2's shapes (same arithmetic, no download)
#
# THREADS (default: every logical CPU), SAMPLES (calibration records of bench quantize,
# default 16), WINDOWS (bench eval, default 16), SCALE_SAMPLES (bench scale, default 4),
# OUT (default target/cpu-bench). Each step has a time limit (LIMIT seconds, default 900) so
# that one slow path cannot eat a borrowed machine's time.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="${OUT:-$root/target/cpu-bench}"
threads="${THREADS:-$(nproc)}"
samples="${SAMPLES:-16}"
windows="${WINDOWS:-16}"
scale_samples="${SCALE_SAMPLES:-4}"
limit="${LIMIT:-900}"
mkdir -p "$out"
status=0
declare -a rows=()
row() { rows+=("| $1 | $2 |"); }

if [ -n "${AWQ_PREBUILT:-}" ]; then
  awq="$AWQ_PREBUILT/bin/awq"
  data="$AWQ_PREBUILT/repo/data"
  configs="$AWQ_PREBUILT/repo/fixtures/configs"
  model="$out/smollm2-135m-synthetic"
  [ -f "$model/config.json" ] || "$awq" synth "$configs/smollm2-135m.json" --dtype f32 --out "$model" --force
  awq_model="$AWQ_PREBUILT/model"
else
  cargo build --release --quiet -p pipeline || exit 1
  awq="${CARGO_TARGET_DIR:-$root/target}/release/awq"
  data="$root/data"
  configs="$root/fixtures/configs"
  model=$(scripts/fetch-model.sh) || exit 1
  awq_model=""
fi

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
features=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' | tr '\n' ' ')
echo "cpu-bench: $cpu; $(nproc) logical CPUs; $features; $threads threads"

step() { # name log command...
  local name=$1 log=$2
  shift 2
  echo "cpu-bench: $name" >&2
  if timeout "$limit" "$@" >"$log" 2>"$log.err"; then
    cat "$log"
    return 0
  fi
  status=1
  row "$name" "FAILED or over ${limit}s: $(tail -n 1 "$log.err")"
  return 1
}
json() { python3 -c "$1" "${@:2}"; }

if step "bench quantize ($samples records, g64)" "$out/bench-quantize.md" \
  "$awq" bench quantize "$model" --out "$out/quantized" --calib "$data/wikitext2-valid.txt" \
  --samples "$samples" --group-size 64 --threads "$threads" --force --json "$out/bench-quantize.json"; then
  row "bench quantize ($samples records, g64): total seconds, speed-up over f32" "$(json '
import json, sys
r = json.load(open(sys.argv[1]))
print("; ".join("%s %.1f s (%s)" % (p["compute"], p["run"]["quantization"]["seconds"]["total"],
      "%.2fx" % p["speedup_over_f32"] if p.get("speedup_over_f32") else "baseline") for p in r["paths"]))
' "$out/bench-quantize.json")"
fi
# The real checkpoint where one came with the bundle, else the fastest path's output above.
if [ -z "$awq_model" ]; then
  awq_model=$(ls -d "$out"/quantized-* 2>/dev/null | grep -E 'amx$' || ls -d "$out"/quantized-* 2>/dev/null | tail -n 1)
fi
if [ -n "$awq_model" ] && step "bench eval ($windows windows of 512)" "$out/bench-eval.md" \
  "$awq" bench eval "$awq_model" --data "$data/wiki.test.raw" --ctx 512 --windows "$windows" \
  --threads "$threads" --json "$out/bench-eval.json"; then
  row "bench eval ($windows windows of 512): tokens/s, speed-up over f32, PPL" "$(json '
import json, sys
r = json.load(open(sys.argv[1]))
print("; ".join("%s %.1f (%s, PPL %.4f)" % (p["compute"], p["eval"]["tokens_per_second"],
      "%.2fx" % p["speedup_over_f32"] if p.get("speedup_over_f32") else "baseline", p["eval"]["ppl"])
      for p in r["paths"]))
' "$out/bench-eval.json")"
fi
for compute in $(json '
import json, sys
print(" ".join(p["compute"] for p in json.load(open(sys.argv[1]))["paths"]))
' "$out/bench-quantize.json" 2>/dev/null || echo f32); do
  if step "bench scale, Llama-2-7B shape, 1 layer ($compute)" "$out/bench-scale-$compute.md" \
    "$awq" bench scale "$configs/llama-2-7b.json" --work "$out/scale" --calib "$data/wikitext2-valid.txt" \
    --layers 1 --samples "$scale_samples" --compute "$compute" --threads "$threads" --json "$out/bench-scale-$compute.json"; then
    row "bench scale, Llama-2-7B shape, 1 layer, $scale_samples records ($compute)" "$(json '
import json, sys
r = json.load(open(sys.argv[1]))
q = r["quantized"][0]
print("%.1f s/layer (%.2fx its floor at %.0f GFLOP/s), peak RSS %.2f GB; whole model at %d tokens: %.1f h"
      % (q["seconds_per_layer"], q["seconds_per_layer"] / q["floor_seconds_per_layer"], r["gemm_gflops"],
         (q["peak_rss_bytes"] or 0) / 1e9, r["projected_tokens"], q["projected_model_seconds_at_tokens"] / 3600))
' "$out/bench-scale-$compute.json")"
  fi
done

echo
echo "CPU bench on $cpu ($threads threads, $(date -u +%FT%TZ)); tables and JSON in $out"
echo "| measurement | result |"
echo "|---|---|"
printf '%s\n' "${rows[@]}"
exit $status
