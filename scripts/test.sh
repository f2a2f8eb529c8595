#!/usr/bin/env bash
# The project's test command (README, CI): fetch the test model, then formatting, lints and
# every test of the workspace. Fixtures that are absent fail the tests here, never skip them.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-model.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --quiet -- -D warnings
AWQ_REQUIRE_FIXTURES=1 cargo test --workspace --release
