//! Building a host emulator of CUDA kernels (`emulation/cuda_host.h`): a `main` in
//! `emulation/` compiled with the kernel's own source as `{name}_host.inc`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles `emulation/{main}` with `source` as `{name}_host.inc`, under AddressSanitizer;
/// `None` (after saying why `test` skips) where there is no C++ compiler, unless
/// `AWQ_REQUIRE_CXX=1`, where that fails.
pub fn emulator(
    test: &str,
    built: &'static std::sync::OnceLock<Result<PathBuf, String>>,
    name: &str,
    main: &str,
    source: impl FnOnce() -> String,
) -> Option<&'static Path> {
    match built.get_or_init(|| build(name, main, source())) {
        Ok(exe) => Some(exe),
        Err(reason) => {
            testkit::skip::unavailable(test, testkit::skip::Condition::Cxx, reason);
            None
        }
    }
}

fn build(name: &str, main: &str, source: String) -> Result<PathBuf, String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-emulation"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}_host.inc")), source).unwrap();
    let exe = dir.join("host");
    let main = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/emulation")
        .join(main);
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-w", "-fsanitize=address", "-I"])
        .arg(&dir)
        .arg(&main)
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Ok(s) if s.success() => Ok(exe),
        Ok(s) => panic!("{cxx} could not compile the emulated {name} kernels ({s})"),
        Err(e) => Err(format!("no C++ compiler `{cxx}` ({e})")),
    }
}
