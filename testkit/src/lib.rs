//! Test fixtures shared by the workspace's tests: the reference data in `../shared` and the
//! SmolLM2 model that `scripts/fetch-model.sh` fetches and imports.
//!
//! A fixture that is absent makes the test print why and skip — unless
//! `AWQ_REQUIRE_FIXTURES=1` (set by `scripts/test.sh`, hence by CI), where absence fails the
//! test, so that nothing passes silently where the fixtures should be.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives inside the workspace")
        .to_path_buf()
}

/// Folder holding fetched models: `AWQ_CACHE_DIR`, else `$XDG_CACHE_HOME/awq-pipeline`,
/// else `~/.cache/awq-pipeline` (the same rule as `scripts/fetch-model.sh`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AWQ_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("awq-pipeline")
}

fn missing(what: &str, path: &Path, how: &str) -> Option<PathBuf> {
    let message = format!("{what} not found at {} ({how})", path.display());
    if std::env::var("AWQ_REQUIRE_FIXTURES").is_ok_and(|v| v == "1") {
        panic!("AWQ_REQUIRE_FIXTURES=1 but {message}");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// `../shared` beside the workspace (or `AWQ_SHARED_DIR`), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("AWQ_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared"));
    if dir.join("ref").is_dir() {
        Some(dir)
    } else {
        missing(
            "shared reference data",
            &dir,
            "it sits beside the repository in CI",
        )
    }
}

/// A file or folder inside `../shared`, if present.
pub fn shared(relative: &str) -> Option<PathBuf> {
    let path = shared_dir()?.join(relative);
    if path.exists() {
        Some(path)
    } else {
        missing("shared reference file", &path, "the shared folder is incomplete")
    }
}

const FETCH_HINT: &str = "run scripts/fetch-model.sh";

/// The SmolLM2-135M-Instruct Q4_1 GGUF file, if fetched.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        missing("the SmolLM2 GGUF", &path, FETCH_HINT)
    }
}

/// The SmolLM2 checkpoint imported in f32, if fetched and imported.
pub fn smollm2_f32() -> Option<PathBuf> {
    let path = cache_dir().join("smollm2-135m-f32");
    if path.join("config.json").is_file() {
        Some(path)
    } else {
        missing("the imported SmolLM2 checkpoint", &path, FETCH_HINT)
    }
}

/// Reads and parses a JSON file, panicking with its path on failure.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
