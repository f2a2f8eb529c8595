#!/usr/bin/env bash
# The project's test command (README, CI): fetch the test model, then formatting, lints and
# every test of the workspace. Every fixture is in the repository (SmolLM2 is fetched first);
# GPU tests skip, saying why, where no GPU is present (scripts/gpu-check.sh runs them on one).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-model.sh >/dev/null
# NVRTC compiles every CUDA kernel for sm_90 in the tests, GPU or not.
nvrtc_lib="$(scripts/fetch-nvrtc.sh)"
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export AWQ_REQUIRE_NVRTC=1
# The fused W4A16 kernels also run on the CPU, compiled as C++ (cuda-kernels/tests/emulated_w4a16.rs).
export AWQ_REQUIRE_CXX=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --quiet -- -D warnings
cargo test --workspace --release
