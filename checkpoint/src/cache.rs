//! Where fetched and imported models live: `$AWQ_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/awq-pipeline`, else `~/.cache/awq-pipeline`. `scripts/fetch-model.sh` asks
//! `awq cache-dir`, so this is the only place the rule is written.

use std::path::PathBuf;

/// The environment variable that overrides the cache folder.
pub const CACHE_DIR_VAR: &str = "AWQ_CACHE_DIR";

/// The cache folder.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_DIR_VAR).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("awq-pipeline")
}
