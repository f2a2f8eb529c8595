//! Every kernel compiles for sm_90 (the H100/H200) with NVRTC, no GPU needed; the
//! assembler's registers, stack and spills are printed. Reported as skipped where libnvrtc
//! cannot be loaded — unless `AWQ_REQUIRE_NVRTC=1` (set by `scripts/test.sh`, which installs
//! the NVRTC wheel), where that fails (`testkit::skip`).

use cuda_kernels::compile::{check, nvrtc_available};
use cuda_kernels::source::SOURCES;

#[test]
fn every_kernel_compiles_for_sm90() {
    if !nvrtc_available() {
        testkit::skip::unavailable(
            "every_kernel_compiles_for_sm90",
            testkit::skip::Condition::Nvrtc,
            "libnvrtc.so.13 is not on the library path (scripts/fetch-nvrtc.sh installs it)",
        );
        return;
    }
    println!(
        "{:<16} {:<16} {:>9} {:>7} {:>13} {:>12} {:>7}",
        "module", "kernel", "registers", "stack", "spill stores", "spill loads", "smem"
    );
    for source in SOURCES {
        let kernels = check(source, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        for entry in source.entries {
            let k = kernels
                .iter()
                .find(|k| k.entry == *entry)
                .unwrap_or_else(|| panic!("{}: entry `{entry}` was not compiled", source.name));
            println!(
                "{:<16} {:<16} {:>9} {:>7} {:>13} {:>12} {:>7}",
                source.name,
                k.entry,
                k.registers,
                k.stack_bytes,
                k.spill_stores,
                k.spill_loads,
                k.shared_bytes
            );
            assert_eq!(
                k.spill_stores + k.spill_loads,
                0,
                "{}: `{entry}` spills registers",
                source.name
            );
        }
    }
}
