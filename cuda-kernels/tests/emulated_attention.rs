//! The attention kernel's own source (attention.cu), compiled for the CPU and run by
//! `tests/emulation/attention_host.cpp` on the grid `launch::attention_launch` gives, against
//! a direct f64 attention: plain forward passes (several sequences, blocks straddling them)
//! and KV-cache layouts (single decode steps, prefill chunks after cached positions, sliding
//! windows shorter than the past). No GPU needed; the GPU test
//! (tp-runtime/tests/cuda_backend.rs) checks the same layouts on the hardware.
//!
//! Built with AddressSanitizer: a read past the key store fails. Skips, saying why, without a
//! C++20 compiler — unless `AWQ_REQUIRE_CXX=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cuda_kernels::launch::{ATTENTION_THREADS, attention_launch};
use cuda_kernels::source::module_of;
use rand::{RngExt, SeedableRng};
use testkit::reference::{self, Heads};

#[path = "emulation/build.rs"]
mod build;

/// attention.cu as host C++: dynamic shared memory becomes the emulator's buffer.
fn host_source() -> String {
    let module = module_of("attention").expect("the attention module");
    let source = module.code.replace(
        "extern __shared__ float smem[];",
        "float* smem = reinterpret_cast<float*>(emu_smem);",
    );
    assert_ne!(
        source, module.code,
        "attention.cu declares its shared memory differently now"
    );
    source
}

fn emulator(test: &str) -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build::emulator(test, &BUILT, "attention", "attention_host.cpp", host_source)
}

/// One call: queries at (key_base, pos) per row over a key store of `key_rows` rows.
struct Case {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    softcap: Option<f32>,
    key_rows: usize,
    key_base: Vec<u32>,
    pos: Vec<u32>,
}

/// Query rows of sequences of `lengths` in a plain forward pass (keys = the query rows).
fn plain(lengths: &[usize]) -> (Vec<u32>, Vec<u32>, usize) {
    let (mut base, mut pos, mut start) = (Vec::new(), Vec::new(), 0);
    for &n in lengths {
        base.extend(std::iter::repeat_n(start as u32, n));
        pos.extend(0..n as u32);
        start += n;
    }
    (base, pos, start)
}

/// Query rows of `(new tokens, cached positions)` per sequence in a cache of `capacity`.
fn cached(seqs: &[(usize, usize)], capacity: usize) -> (Vec<u32>, Vec<u32>, usize) {
    let (mut base, mut pos) = (Vec::new(), Vec::new());
    for (s, &(new, past)) in seqs.iter().enumerate() {
        base.extend(std::iter::repeat_n((s * capacity) as u32, new));
        pos.extend((past..past + new).map(|p| p as u32));
    }
    (base, pos, seqs.len() * capacity)
}

fn run(exe: &Path, case: &Case, seed: u64) {
    let rows = case.pos.len();
    let (d, heads, kv_heads) = (case.head_dim, case.heads, case.kv_heads);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let q = random(rows * heads * d);
    let k = random(case.key_rows * kv_heads * d);
    let v = random(case.key_rows * kv_heads * d);
    let scale = 1.0 / (d as f32).sqrt();
    let launch = attention_launch(rows, heads, d);
    let mut bytes = Vec::new();
    for n in [
        rows,
        case.key_rows,
        heads,
        kv_heads,
        d,
        case.window.unwrap_or(0),
        launch.key_tile,
        launch.grid.0 as usize,
        launch.grid.1 as usize,
        ATTENTION_THREADS as usize,
    ] {
        bytes.extend((n as u64).to_le_bytes());
    }
    bytes.extend(scale.to_le_bytes());
    bytes.extend(case.softcap.unwrap_or(0.0).to_le_bytes());
    for values in [&q, &k, &v] {
        bytes.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    }
    for ids in [&case.key_base, &case.pos] {
        bytes.extend(ids.iter().flat_map(|x| x.to_le_bytes()));
    }
    let dir = exe.parent().unwrap();
    let (input, output) = (
        dir.join(format!("{}.in", case.name)),
        dir.join(format!("{}.out", case.name)),
    );
    std::fs::write(&input, bytes).unwrap();
    let status = Command::new(exe).arg(&input).arg(&output).status().unwrap();
    assert!(status.success(), "{}: the emulator failed ({status})", case.name);
    let got: Vec<f32> = std::fs::read(&output)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let h = Heads {
        heads,
        kv_heads,
        head_dim: d,
        window: case.window,
        scale,
        softcap: case.softcap,
    };
    let want = reference::attention(&q, &k, &v, h, &case.key_base, &case.pos);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
    eprintln!("{}: {rows} queries, max error {err:.1e}", case.name);
    assert!(err < 1e-5, "{}: max error {err}", case.name);
}

#[test]
fn attention_kernel_matches_direct_attention_on_the_host() {
    let Some(exe) = emulator("attention_kernel_matches_direct_attention_on_the_host") else {
        return;
    };
    let case =
        |name, heads, kv_heads, head_dim, window, (key_base, pos, key_rows): (Vec<u32>, Vec<u32>, usize)| {
            Case {
                name,
                heads,
                kv_heads,
                head_dim,
                window,
                softcap: None,
                key_rows,
                key_base,
                pos,
            }
        };
    let cases = [
        case("plain-straddling", 4, 2, 32, None, plain(&[45, 3, 30])),
        case("plain-window", 2, 1, 64, Some(20), plain(&[70])),
        case("plain-wide-heads", 2, 2, 128, None, plain(&[40, 9])),
        case(
            "decode-steps",
            3,
            1,
            64,
            None,
            cached(&[(1, 200), (1, 0), (1, 63)], 256),
        ),
        case(
            "prefill-after-cache",
            4,
            2,
            32,
            None,
            cached(&[(40, 100), (1, 255), (5, 7)], 256),
        ),
        case(
            "window-past-the-prompt",
            4,
            2,
            32,
            Some(50),
            cached(&[(1, 180), (33, 90)], 256),
        ),
    ];
    // Gemma 2's soft-capping, at a cap low enough to change most scores here.
    let capped = Case {
        softcap: Some(0.3),
        ..case("plain-softcap-window", 4, 2, 32, Some(20), plain(&[45, 3, 30]))
    };
    let cases: Vec<Case> = cases.into_iter().chain([capped]).collect();
    for (i, c) in cases.iter().enumerate() {
        run(exe, c, i as u64);
    }
}
