#!/usr/bin/env bash
# The project's test command (README, CI): fetch the test model, then formatting, lints and
# every test of the workspace, and a closing summary. Every fixture is in the repository
# (SmolLM2 is fetched first). No test passes by skipping: every condition this machine can
# meet is required (AWQ_REQUIRE_*: the NVRTC installed here, a C++ compiler, the CPU's bf16
# and AMX features where /proc/cpuinfo lists them), and a test that cannot run for a reason
# no setup here can meet (no GPU: scripts/gpu-check.sh runs those) is reported as skipped,
# by name and reason, in the summary (testkit::skip).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-model.sh >/dev/null
# NVRTC compiles every CUDA kernel for sm_90 in the tests, GPU or not.
nvrtc_lib="$(scripts/fetch-nvrtc.sh)"
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export AWQ_REQUIRE_NVRTC=1
# The fused W4A16 kernels also run on the CPU, compiled as C++ (cuda-kernels/tests/emulated_w4a16.rs).
export AWQ_REQUIRE_CXX=1
# The 16-bit compute paths are tested wherever the CPU has them.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
if [[ " $flags " == *" avx512_bf16 "* ]]; then export AWQ_REQUIRE_AVX512_BF16=1; fi
if [[ " $flags " == *" amx_bf16 "* && " $flags " == *" amx_tile "* ]]; then export AWQ_REQUIRE_AMX=1; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export AWQ_SKIP_LOG="$work/skipped.tsv"
: >"$AWQ_SKIP_LOG"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --quiet -- -D warnings
status=0
cargo test --workspace --release 2>&1 | tee "$work/test.log" || status=$?

# The summary: cargo counts a skipped test as passed, so skips are taken out of the passes.
read -r passed failed < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i - 1); if ($(i) ~ /^failed/) f += $(i - 1) }
  } END { print p + 0, f + 0 }' "$work/test.log")
skipped=$(cut -f1 "$AWQ_SKIP_LOG" | sort -u | wc -l)
echo
echo "summary (AWQ_REQUIRE: $(env | grep -o '^AWQ_REQUIRE_[A-Z0-9_]*' | sed 's/AWQ_REQUIRE_//' | sort | paste -sd, -)):"
sort -u "$AWQ_SKIP_LOG" | awk -F'\t' '{ printf "  skipped %s: %s\n", $1, $2 }'
echo "tests: $((passed - skipped)) passed, $failed failed, $skipped skipped"
exit "$status"
