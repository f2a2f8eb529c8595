//! The W4A16 kernels' own source (fused and dequantizing), compiled for the CPU with a host
//! C++ compiler and run by `tests/emulation/host.cpp` (every CUDA thread a host thread, the
//! warp collectives at barriers, the PTX helpers in C++), against the layout's CPU twin: no
//! GPU needed. It checks the kernels' logic — fragment and lane indexing, the register ring,
//! group changes, split-K and its arrival counters, rows past M — on the grids
//! `launch::fused_launch` gives; the hardware's arithmetic is checked by the GPU tests
//! (tp-runtime/tests/cuda_backend.rs).
//!
//! The emulator is built with AddressSanitizer: a kernel that reads or writes past a buffer
//! fails. Skips, saying why, without a C++20 compiler (`CXX`, else `g++`) — unless
//! `AWQ_REQUIRE_CXX=1` (set by `scripts/test.sh`), where that fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cuda_kernels::launch::{FusedKernel, dequant_blocks, fused_launch};
use cuda_kernels::layout::MmaLayout;
use cuda_kernels::source::{COMMON, module_of};
use half::f16;

/// The kernel module as host C++: each helper whose body is inline PTX becomes a
/// declaration (host.cpp defines it), dynamic shared memory becomes host.cpp's buffer, launch
/// bounds go; then the table of fused entry points.
fn host_source() -> String {
    let module = module_of("w4a16_gemv_m8_f32").expect("the W4A16 module");
    let src = format!("{COMMON}\n{}", module.code);
    let marker = "__device__ __forceinline__ ";
    let mut out = String::new();
    let mut rest = src.as_str();
    while let Some(at) = rest.find(marker) {
        out.push_str(&rest[..at]);
        let from = &rest[at..];
        let open = from.find('{').expect("a body");
        let mut depth = 0usize;
        let mut close = open;
        for (i, c) in from[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let body = &from[open..=close];
        if body.contains("asm") {
            out.push_str(from[..open].trim_end());
            out.push(';');
        } else {
            out.push_str(&from[..=close]);
        }
        rest = &from[close + 1..];
    }
    out.push_str(rest);
    let mut out = out.replace(
        "extern __shared__ __align__(16) unsigned char smem[];",
        "unsigned char* smem = emu_smem;",
    );
    while let Some(at) = out.find("__launch_bounds__(") {
        let end = at + out[at..].find(')').expect("closing parenthesis") + 1;
        out.replace_range(at..end, "");
    }
    out.push_str("\nstatic const EntryRow ENTRIES[] = {\n");
    for entry in module.entries.iter().filter(|e| !e.ends_with("dequant")) {
        if entry.ends_with("_f32") {
            out.push_str(&format!("    {{\"{entry}\", {entry}, nullptr}},\n"));
        } else {
            out.push_str(&format!("    {{\"{entry}\", nullptr, {entry}}},\n"));
        }
    }
    out.push_str("};\n");
    out
}

#[path = "emulation/build.rs"]
mod build;

/// The emulator, built once per test run; `None` (after `test` says why it skips) where no
/// compiler is found.
fn emulator(test: &str) -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build::emulator(test, &BUILT, "w4a16", "host.cpp", host_source)
}

/// A deterministic stream of pseudo-random words (splitmix64).
struct Words(u64);

impl Words {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Runs `entry` on `grid` in the emulator: its output widened to f32 and how many split-K
/// counters it left set.
fn run(
    exe: &Path,
    layout: &MmaLayout,
    x: &[f16],
    m: usize,
    entry: &str,
    grid: (u32, u32, u32),
    k_split: usize,
) -> (Vec<f32>, u32) {
    let (k, n, g) = (layout.in_features, layout.out_features, layout.group_size);
    let dir = exe.parent().unwrap();
    let name = format!("{entry}-{k}-{n}-{g}-{m}-{}-{}-{}", grid.0, grid.1, grid.2);
    let (input, output) = (dir.join(format!("{name}.in")), dir.join(format!("{name}.out")));
    let mut bytes = Vec::new();
    for v in [
        k,
        n,
        g,
        m,
        layout.qweight.len(),
        layout.zeros.len(),
        layout.scales.len(),
    ] {
        bytes.extend((v as u64).to_le_bytes());
    }
    bytes.extend(layout.qweight.iter().flat_map(|v| v.to_le_bytes()));
    bytes.extend(layout.zeros.iter().flat_map(|v| v.to_le_bytes()));
    bytes.extend(layout.scales.iter().flat_map(|v| v.to_le_bytes()));
    bytes.extend(x.iter().flat_map(|v| v.to_bits().to_le_bytes()));
    std::fs::write(&input, bytes).unwrap();
    let status = Command::new(exe)
        .arg(&input)
        .arg(&output)
        .arg(entry)
        .args([
            grid.0.to_string(),
            grid.1.to_string(),
            grid.2.to_string(),
            k_split.to_string(),
        ])
        .status()
        .unwrap();
    assert!(status.success(), "{name}: the emulator failed ({status})");
    let out = std::fs::read(&output).unwrap();
    let left = u32::from_le_bytes(out[..4].try_into().unwrap());
    let y = out[4..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (y, left)
}

/// A random AWQ weight `[n, k]` in the "mma" layout.
fn random_layout(rng: &mut Words, k: usize, n: usize, g: usize) -> MmaLayout {
    let words: Vec<u32> = (0..k * n / 8).map(|_| rng.next() as u32).collect();
    let zeros: Vec<u32> = (0..k / g * n / 8).map(|_| rng.next() as u32).collect();
    let scales: Vec<u16> = (0..k / g * n)
        .map(|_| f16::from_f32(rng.uniform(0.001, 0.02)).to_bits())
        .collect();
    MmaLayout::from_gemm(&words, &zeros, &scales, k, n, g).unwrap()
}

#[test]
fn fused_kernels_match_the_layout_twin_on_the_host() {
    let Some(exe) = emulator("fused_kernels_match_the_layout_twin_on_the_host") else {
        return;
    };
    let mut rng = Words(7);
    // Few multiprocessors give long K ranges per warp (many groups, the register ring
    // refilled); many give short ones and deep split-K. N = 136 leaves a partial strip.
    for (case, (k, n, g, sms)) in [
        (2048, 256, 32, 2),
        (1536, 136, 48, 8),
        (1536, 136, 48, 1),
        (576, 192, 64, 132),
    ]
    .into_iter()
    .enumerate()
    {
        let layout = random_layout(&mut rng, k, n, g);
        // The kernels' weights: (q − z) · s rounded to f16.
        let wt: Vec<f64> = layout
            .dequantize()
            .iter()
            .map(|&v| f64::from(f16::from_f32(v).to_f32()))
            .collect();
        for (kernel, m) in [
            (FusedKernel::Gemv, 1),
            (FusedKernel::Gemv, 5),
            (FusedKernel::Gemv, 9),
            (FusedKernel::Gemv, 16),
            (FusedKernel::Mma, 3),
            (FusedKernel::Mma, 20),
            (FusedKernel::Mma, 70),
        ] {
            let x: Vec<f16> = (0..m * k)
                .map(|_| f16::from_f32(rng.uniform(-1.0, 1.0)))
                .collect();
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (row, col) = (i / n, i % n);
                    (0..k)
                        .map(|kk| f64::from(x[row * k + kk].to_f32()) * wt[kk * n + col])
                        .sum()
                })
                .collect();
            // f16 outputs differ only in the final store: one shape is enough.
            let outs: &[bool] = if case == 0 { &[true, false] } else { &[true] };
            for &f32_out in outs {
                let plan = fused_launch(kernel, m, k, n, f32_out, sms).unwrap();
                let what = format!(
                    "{} m{m} k{k} n{n} g{g} on {sms} SMs: grid {:?}, k_split {}",
                    plan.entry, plan.grid, plan.k_split
                );
                let (got, left) = run(exe, &layout, &x, m, plan.entry, plan.grid, plan.k_split);
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{what}: an output was not written"
                );
                assert_eq!(left, 0, "{what}: split-K counters left set");
                let num: f64 = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                    .sum();
                let den: f64 = want.iter().map(|b| b * b).sum();
                let err = (num / den).sqrt();
                // f32 sums of exact f16 products; f16 outputs add one rounding.
                let bound = if f32_out { 1e-5 } else { 1e-3 };
                eprintln!("{what}: relative error {err:.2e} (bound {bound:.0e})");
                assert!(
                    err <= bound,
                    "{what}: relative error {err:.3e} exceeds {bound:.0e}"
                );
            }
        }
    }
}

/// `w4a16_dequant` (the weight as f16 `[n, k]` for cuBLAS) writes, bit for bit, the layout
/// twin's `(q − z) · s` rounded to f16, partial strip and last partial warp included.
#[test]
fn dequant_kernel_matches_the_layout_twin_bit_for_bit() {
    let Some(exe) = emulator("dequant_kernel_matches_the_layout_twin_bit_for_bit") else {
        return;
    };
    let mut rng = Words(11);
    for (k, n, g) in [(576, 192, 64), (1536, 136, 48), (96, 72, 32)] {
        let layout = random_layout(&mut rng, k, n, g);
        let blocks = dequant_blocks(k, n).unwrap();
        let (got, _) = run(exe, &layout, &[], 0, "w4a16_dequant", (blocks, 1, 1), 0);
        let wt = layout.dequantize();
        let mismatches = (0..n * k)
            .filter(|&i| {
                let (row, col) = (i / k, i % k);
                f16::from_f32(got[i]).to_bits() != f16::from_f32(wt[col * n + row]).to_bits()
            })
            .count();
        assert_eq!(
            mismatches, 0,
            "w4a16_dequant k{k} n{n} g{g}: {mismatches} weights differ"
        );
    }
}
