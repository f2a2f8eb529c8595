//! The kernel sources. Each module is `common.cuh` followed by one `.cu` file (NVRTC has no
//! CUDA headers here, so the shared helpers are prepended rather than included).

/// Helpers every module starts with.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// One compilation unit and the entry points it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub code: &'static str,
    pub entries: &'static [&'static str],
}

/// Every module.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "elementwise",
        code: include_str!("../kernels/elementwise.cu"),
        entries: &[
            "rms_norm",
            "rotary",
            "silu_mul",
            "gelu_tanh_mul",
            "scale",
            "softcap",
            "add_assign",
            "add_bias",
            "embed",
            "embed_f16",
            "embed_bf16",
            "gather_rows",
            "fill",
            "to_f16",
            "to_bf16",
        ],
    },
    KernelSource {
        name: "attention",
        code: include_str!("../kernels/attention.cu"),
        entries: &["attention"],
    },
    KernelSource {
        name: "nll",
        code: include_str!("../kernels/nll.cu"),
        entries: &["nll_parts"],
    },
    KernelSource {
        name: "w4a16",
        code: include_str!("../kernels/w4a16.cu"),
        entries: &[
            "w4a16_mma_m1_f32",
            "w4a16_mma_m2_f32",
            "w4a16_mma_m4_f32",
            "w4a16_mma_m1_f16",
            "w4a16_mma_m2_f16",
            "w4a16_mma_m4_f16",
            "w4a16_gemv_m8_f32",
            "w4a16_gemv_m16_f32",
            "w4a16_gemv_m8_f16",
            "w4a16_gemv_m16_f16",
            "w4a16_dequant",
        ],
    },
];

/// The full text NVRTC compiles for a module.
pub fn full_source(source: &KernelSource) -> String {
    format!("{COMMON}\n{}", source.code)
}

/// The module that defines `entry`.
pub fn module_of(entry: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.entries.contains(&entry))
}
