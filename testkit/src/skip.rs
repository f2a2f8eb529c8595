//! Tests that cannot run here are reported, never passed in silence.
//!
//! cargo's harness has no "skipped": a test that returns early counts as passed. A test that
//! lacks something it needs calls [`unavailable`] and returns. Where the test command
//! requires that condition (`AWQ_REQUIRE_<CONDITION>=1`: `scripts/test.sh` sets it for every
//! condition CI can meet — the NVRTC it installs, a C++ compiler, the CPU features
//! `/proc/cpuinfo` lists), the test fails instead. Otherwise the skip is printed and appended
//! to the file `$AWQ_SKIP_LOG` names, which `scripts/test.sh` summarises at the end (how
//! many, which, why).

use std::io::Write;

/// Something a test needs that a machine may lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// An NVIDIA GPU with its driver (and NCCL where the test says so).
    Gpu,
    /// `libnvrtc.so.13` on the library path (`scripts/fetch-nvrtc.sh`).
    Nvrtc,
    /// A C++20 compiler with AddressSanitizer (`$CXX`, else `g++`).
    Cxx,
    /// The CPU feature AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// The CPU features AMX-BF16 and AMX-TILE, with Linux's permission to use the tiles.
    Amx,
    /// A CPU for which a fixture records bit-exact f32 results (`testkit::machine::cpu_key`).
    RecordedCpu,
}

impl Condition {
    /// The variable that makes this condition required: `AWQ_REQUIRE_GPU`, ….
    pub fn variable(self) -> &'static str {
        match self {
            Condition::Gpu => "AWQ_REQUIRE_GPU",
            Condition::Nvrtc => "AWQ_REQUIRE_NVRTC",
            Condition::Cxx => "AWQ_REQUIRE_CXX",
            Condition::Avx512Bf16 => "AWQ_REQUIRE_AVX512_BF16",
            Condition::Amx => "AWQ_REQUIRE_AMX",
            Condition::RecordedCpu => "AWQ_REQUIRE_RECORDED_CPU",
        }
    }

    /// Whether the test command requires this condition here.
    pub fn required(self) -> bool {
        std::env::var(self.variable()).is_ok_and(|v| v == "1")
    }
}

/// `test` cannot run (or cannot run all of its checks) because `condition` is not met here,
/// for `reason`: a failure where the condition is [required](Condition::required), else a
/// skip that is printed and logged for the test command's summary.
pub fn unavailable(test: &str, condition: Condition, reason: &str) {
    if condition.required() {
        panic!("{test}: {}=1 but {reason}", condition.variable());
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("AWQ_SKIP_LOG") {
        // One write per line, appended: tests of one binary run on several threads.
        let line = format!("{test}\t{reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("{test}: cannot log the skip to {}: {e}", log.to_string_lossy());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` with `vars` set (`None`: removed), restoring them afterwards.
    fn with_vars<R>(vars: &[(&str, Option<&std::ffi::OsStr>)], f: impl FnOnce() -> R) -> R {
        let saved: Vec<_> = vars.iter().map(|(k, _)| (*k, std::env::var_os(k))).collect();
        let set = |k: &str, v: Option<&std::ffi::OsStr>| match v {
            // SAFETY: this binary's only test, so no other thread reads the environment.
            Some(v) => unsafe { std::env::set_var(k, v) },
            None => unsafe { std::env::remove_var(k) },
        };
        vars.iter().for_each(|(k, v)| set(k, *v));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        saved.iter().for_each(|(k, v)| set(k, v.as_deref()));
        result.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    #[test]
    fn a_skip_is_logged_unless_its_condition_is_required() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let one = Some(std::ffi::OsStr::new("1"));
        let logged = with_vars(
            &[
                ("AWQ_SKIP_LOG", Some(log.path().as_os_str())),
                ("AWQ_REQUIRE_GPU", None),
            ],
            || {
                unavailable("t1", Condition::Gpu, "no GPU");
                unavailable("t2", Condition::Gpu, "no driver");
                std::fs::read_to_string(log.path()).unwrap()
            },
        );
        assert_eq!(logged, "t1\tno GPU\nt2\tno driver\n");
        let failed = with_vars(&[("AWQ_REQUIRE_AMX", one)], || {
            std::panic::catch_unwind(|| unavailable("t", Condition::Amx, "no AMX"))
        });
        let message = *failed.unwrap_err().downcast::<String>().unwrap();
        assert_eq!(message, "t: AWQ_REQUIRE_AMX=1 but no AMX");
    }
}
