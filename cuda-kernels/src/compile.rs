//! NVRTC compilation: PTX for the device's own architecture at run time, and a compile
//! check (SASS with the assembler's resource report) that needs no GPU.

use std::ffi::{CStr, CString};

use cudarc::nvrtc::{Ptx, result, sys};

use crate::source::{KernelSource, full_source};
use crate::{KernelError, Result};

/// Options every compilation uses.
const OPTIONS: &[&str] = &["-std=c++17"];

/// Whether libnvrtc can be loaded here.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to load the shared library.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's names of a compute capability: `("compute_90", "sm_90")`.
pub fn arch_names(major: i32, minor: i32) -> (String, String) {
    (format!("compute_{major}{minor}"), format!("sm_{major}{minor}"))
}

fn lossy(chars: &[core::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles a module with `arch` (`compute_XX` for PTX, `sm_XX` for SASS) and extra
/// options; returns the PTX (when requested) and the program log.
fn compile(
    source: &KernelSource,
    arch: &str,
    extra: &[&str],
    want_ptx: bool,
) -> Result<(Option<Vec<u8>>, String)> {
    if !nvrtc_available() {
        return Err(KernelError::MissingLibrary("NVRTC"));
    }
    let src = CString::new(full_source(source)).expect("kernel sources hold no NUL");
    let name = CString::new(format!("{}.cu", source.name)).expect("module names hold no NUL");
    let prog = result::create_program(&src, Some(&name))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("-arch={arch}"));
    options.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: prog is a live program; it is destroyed below on every path.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| lossy(&l))
        .unwrap_or_default();
    let ptx = match compiled {
        Err(_) => {
            unsafe {
                let _ = result::destroy_program(prog);
            }
            return Err(KernelError::Compile {
                name: source.name,
                arch: arch.to_string(),
                log,
            });
        }
        Ok(()) if want_ptx => {
            let ptx = unsafe { result::get_ptx(prog) }.map_err(KernelError::from);
            ptx.map(|p| Some(p.iter().map(|&c| c as u8).collect::<Vec<u8>>()))
        }
        Ok(()) => Ok(None),
    };
    unsafe {
        let _ = result::destroy_program(prog);
    }
    Ok((ptx?, log))
}

/// PTX of a module for a virtual architecture (`compute_90`), ready for the driver.
pub fn ptx(source: &KernelSource, arch: &str) -> Result<Ptx> {
    let (ptx, _) = compile(source, arch, &[], true)?;
    let ptx = ptx.expect("requested");
    let text = CStr::from_bytes_until_nul(&ptx)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&ptx).into_owned());
    Ok(Ptx::from_src(text))
}

/// The assembler's resource report of one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub entry: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
}

fn number_before(line: &str, unit: &str) -> u32 {
    line.split(',')
        .find(|part| part.contains(unit))
        .and_then(|part| part.split_whitespace().find_map(|w| w.parse().ok()))
        .unwrap_or(0)
}

/// Parses ptxas's `-v` report.
pub fn parse_resources(log: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernels.push(KernelResources {
                entry: rest.split('\'').next().unwrap_or_default().to_string(),
                ..KernelResources::default()
            });
        } else if let Some(k) = kernels.last_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = number_before(line, "stack frame");
                k.spill_stores = number_before(line, "spill stores");
                k.spill_loads = number_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers");
                k.shared_bytes = number_before(line, "smem");
            }
        }
    }
    kernels
}

/// Compiles a module to SASS for `sm` (e.g. `sm_90`) with the assembler's verbose report,
/// as CI does without a GPU; an error on any compile error.
pub fn check(source: &KernelSource, sm: &str) -> Result<Vec<KernelResources>> {
    let (_, log) = compile(source, sm, &["--ptxas-options=-v"], false)?;
    Ok(parse_resources(&log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                   ptxas         .     16 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n\
                   ptxas info    : Used 95 registers, used 1 barriers, 20480 bytes smem\n";
        let k = &parse_resources(log)[0];
        assert_eq!(
            (
                k.entry.as_str(),
                k.registers,
                k.stack_bytes,
                k.spill_stores,
                k.spill_loads,
                k.shared_bytes
            ),
            ("k", 95, 16, 4, 8, 20480)
        );
    }
}
