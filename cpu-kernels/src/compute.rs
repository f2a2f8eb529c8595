//! The arithmetic of matrix products on the CPU: f32 (the exact reference), or bf16
//! operands with f32 accumulation where the CPU multiplies 16-bit pairs natively. A request
//! (`--compute f32|bf16|auto`, `[runtime] compute`) is resolved once against the CPU's
//! features; asking for a path the CPU lacks is an error naming the missing feature.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What a user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeRequest {
    /// f32 operands: exact products, the reference every other path is checked against.
    F32,
    /// bf16 operands, f32 accumulation by AVX512-BF16; an error where the CPU lacks it.
    Bf16,
    /// bf16 operands, f32 accumulation by AMX tiles; an error where the CPU lacks AMX-BF16 or
    /// Linux refuses the tile state.
    Amx,
    /// 16-bit where the CPU supports it and the work is 16-bit in nature (AWQ weights, bf16
    /// or f16 checkpoints, the scale search); f32 otherwise.
    #[default]
    Auto,
}

impl FromStr for ComputeRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(ComputeRequest::F32),
            "bf16" => Ok(ComputeRequest::Bf16),
            "amx" => Ok(ComputeRequest::Amx),
            "auto" => Ok(ComputeRequest::Auto),
            other => Err(format!("compute must be f32, bf16, amx or auto, not {other:?}")),
        }
    }
}

impl fmt::Display for ComputeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComputeRequest::F32 => "f32",
            ComputeRequest::Bf16 => "bf16",
            ComputeRequest::Amx => "amx",
            ComputeRequest::Auto => "auto",
        })
    }
}

/// The arithmetic that runs: what reports record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// f32 products (the `gemm` crate).
    #[default]
    F32,
    /// bf16 × bf16 products accumulated in f32 by AVX512-BF16's `vdpbf16ps` (the `gemmkit`
    /// crate); activations and weight tiles are rounded to bf16 as they enter a product.
    Bf16,
    /// The same bf16 operands multiplied by AMX-BF16 tiles (`tdpbf16ps`, our kernel), each
    /// output one f32 sum; Gram matrices of the scale search stay on `vdpbf16ps`.
    Amx,
}

/// The instructions that multiply the bf16 operands of a 16-bit path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AVX512-BF16 `vdpbf16ps` through `gemmkit`; each output rounded once to bf16.
    Vdpbf16ps,
    /// AMX-BF16 tiles; each output one f32 sum.
    Amx,
}

impl Compute {
    /// The kernel, as reports and `awq bench` print it.
    pub fn kernel(self) -> &'static str {
        match self {
            Compute::F32 => "f32 (gemm, fma)",
            Compute::Bf16 => "bf16 (gemmkit, avx512-bf16 vdpbf16ps, f32 accumulation)",
            Compute::Amx => "bf16 (amx-bf16 tdpbf16ps tiles, f32 accumulation)",
        }
    }

    /// The kernel of a 16-bit path; `None` for f32.
    pub fn bf16_kernel(self) -> Option<Bf16Kernel> {
        match self {
            Compute::F32 => None,
            Compute::Bf16 => Some(Bf16Kernel::Vdpbf16ps),
            Compute::Amx => Some(Bf16Kernel::Amx),
        }
    }
}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
            Compute::Amx => "amx",
        })
    }
}

/// The CPU features that decide the compute path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    /// `vdpbf16ps`: bf16 pairs multiplied and accumulated into f32.
    pub avx512_bf16: bool,
    /// Whether `vdpbf16ps` does more multiply-adds per cycle than f32 FMA: AMD's cores (Zen 4
    /// and 5) issue it at the FMA rate with twice the products, Intel's at half the rate of
    /// their two FMA units — no faster than f32 there (0.67× f32 measured on an Emerald
    /// Rapids Xeon at 2 threads), so `auto` does not take it on Intel.
    pub bf16_outpaces_f32: bool,
    /// Intel's tile unit (AMX-TILE and AMX-BF16 in CPUID: Sapphire Rapids and later).
    pub amx_bf16: bool,
    /// Whether Linux granted this process the AMX tile state (asked once, where
    /// `amx_bf16`).
    pub amx_permitted: bool,
}

impl CpuFeatures {
    /// The features of the CPU this process runs on.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid_count;
            // CPUID.(EAX=7, ECX=0):EDX bits 22 and 24 are AMX-BF16 and AMX-TILE (leaf 7
            // exists on every CPU with AVX2); leaf 0 spells the vendor in EBX, EDX, ECX.
            let amx_bf16 = std::arch::is_x86_feature_detected!("avx2")
                && __cpuid_count(7, 0).edx & (1 << 22 | 1 << 24) == (1 << 22 | 1 << 24);
            let leaf0 = __cpuid_count(0, 0);
            let amd = [leaf0.ebx, leaf0.edx, leaf0.ecx] == [0x6874_7541, 0x6974_6E65, 0x444D_4163];
            let avx512_bf16 = std::arch::is_x86_feature_detected!("avx512bf16");
            CpuFeatures {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                avx512_bf16,
                bf16_outpaces_f32: avx512_bf16 && amd,
                amx_bf16,
                amx_permitted: amx_bf16 && amx_permitted(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuFeatures::default()
    }

    /// Whether a native bf16 product exists.
    pub fn has_bf16(&self) -> bool {
        self.avx512_bf16
    }
}

impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = [
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("avx512f", self.avx512f),
            ("avx512_bf16", self.avx512_bf16),
            ("amx_bf16", self.amx_bf16),
        ];
        let list: Vec<String> = flags
            .iter()
            .map(|(name, on)| format!("{}{name}", if *on { "+" } else { "-" }))
            .collect();
        f.write_str(&list.join(" "))
    }
}

/// Whether this process may use the tile registers: asks Linux once for the tile data state
/// (`ARCH_REQ_XCOMP_PERM` with `XFEATURE_XTILEDATA`) and checks it was granted. Call only
/// where CPUID reports AMX-TILE and AMX-BF16.
pub(crate) fn amx_permitted() -> bool {
    static PERMITTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PERMITTED.get_or_init(request_tile_data)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    let mut granted: u64 = 0;
    // SAFETY: arch_prctl with these codes only reads its integer argument and writes the
    // permitted feature mask into `granted`.
    unsafe {
        libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
            && libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_GET_XCOMP_PERM,
                &mut granted as *mut u64,
            ) == 0
            && granted & (1 << XFEATURE_XTILEDATA) != 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_data() -> bool {
    false
}

impl ComputeRequest {
    /// Whether this is the default, `auto`.
    pub fn is_auto(&self) -> bool {
        *self == ComputeRequest::Auto
    }

    /// The path that runs on a CPU with `features`; `sixteen_bit_work` says whether `auto`
    /// should take 16 bits (AWQ weights, a 16-bit checkpoint, the scale search): AMX where
    /// present and permitted, else `vdpbf16ps` where it outpaces f32 (AMD), else f32.
    pub fn resolve(self, features: &CpuFeatures, sixteen_bit_work: bool) -> Result<Compute> {
        match self {
            ComputeRequest::F32 => Ok(Compute::F32),
            ComputeRequest::Bf16 if features.has_bf16() => Ok(Compute::Bf16),
            ComputeRequest::Bf16 => Err(Error::Unavailable(format!(
                "compute = bf16 needs the CPU feature avx512_bf16 (vdpbf16ps), which this CPU lacks \
                 (it has: {features}); use compute = f32 or auto"
            ))),
            ComputeRequest::Amx if features.amx_bf16 && features.amx_permitted && features.has_bf16() => {
                Ok(Compute::Amx)
            }
            ComputeRequest::Amx if features.amx_bf16 && features.has_bf16() => Err(Error::Unavailable(
                "compute = amx: this CPU has amx_bf16 but Linux refused the AMX tile state \
                 (arch_prctl ARCH_REQ_XCOMP_PERM); use compute = bf16, f32 or auto"
                    .into(),
            )),
            ComputeRequest::Amx => Err(Error::Unavailable(format!(
                "compute = amx needs the CPU features amx_bf16 (with amx_tile) and avx512_bf16, which \
                 this CPU lacks (it has: {features}); use compute = f32 or auto"
            ))),
            ComputeRequest::Auto if sixteen_bit_work && features.amx_permitted && features.has_bf16() => {
                Ok(Compute::Amx)
            }
            ComputeRequest::Auto if sixteen_bit_work && features.bf16_outpaces_f32 => Ok(Compute::Bf16),
            ComputeRequest::Auto => Ok(Compute::F32),
        }
    }

    /// Every path that runs on a CPU with `features`, f32 first: what `awq bench` compares.
    pub fn available(features: &CpuFeatures) -> Vec<Compute> {
        let mut paths = vec![Compute::F32];
        if features.has_bf16() {
            paths.push(Compute::Bf16);
        }
        if features.has_bf16() && features.amx_bf16 && features.amx_permitted {
            paths.push(Compute::Amx);
        }
        paths
    }

    /// [`resolve`](Self::resolve) against this CPU.
    pub fn resolve_here(self, sixteen_bit_work: bool) -> Result<Compute> {
        self.resolve(&CpuFeatures::detect(), sixteen_bit_work)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AMD Zen 4 or 5.
    const WITH_BF16: CpuFeatures = CpuFeatures {
        avx2: true,
        fma: true,
        avx512f: true,
        avx512_bf16: true,
        bf16_outpaces_f32: true,
        amx_bf16: false,
        amx_permitted: false,
    };
    /// An Intel Xeon with AVX512-BF16 and AMX (Sapphire Rapids and later).
    const WITH_AMX: CpuFeatures = CpuFeatures {
        bf16_outpaces_f32: false,
        amx_bf16: true,
        amx_permitted: true,
        ..WITH_BF16
    };
    const WITHOUT_BF16: CpuFeatures = CpuFeatures {
        avx512_bf16: false,
        bf16_outpaces_f32: false,
        ..WITH_BF16
    };

    #[test]
    fn forced_bf16_on_a_cpu_without_it_names_the_feature() {
        let err = ComputeRequest::Bf16
            .resolve(&WITHOUT_BF16, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("avx512_bf16"), "{err}");
        assert!(
            err.contains("-avx512_bf16"),
            "the CPU's features are listed: {err}"
        );
        assert_eq!(
            ComputeRequest::Bf16.resolve(&WITH_BF16, false).unwrap(),
            Compute::Bf16
        );
    }

    #[test]
    fn auto_takes_sixteen_bits_only_for_sixteen_bit_work_on_a_capable_cpu() {
        assert_eq!(
            ComputeRequest::Auto.resolve(&WITH_BF16, true).unwrap(),
            Compute::Bf16
        );
        assert_eq!(
            ComputeRequest::Auto.resolve(&WITH_BF16, false).unwrap(),
            Compute::F32
        );
        assert_eq!(
            ComputeRequest::Auto.resolve(&WITHOUT_BF16, true).unwrap(),
            Compute::F32
        );
        assert_eq!(
            ComputeRequest::F32.resolve(&WITH_BF16, true).unwrap(),
            Compute::F32
        );
    }

    #[test]
    fn auto_takes_amx_where_permitted_and_f32_on_intel_without_it() {
        assert_eq!(
            ComputeRequest::Auto.resolve(&WITH_AMX, true).unwrap(),
            Compute::Amx
        );
        assert_eq!(
            ComputeRequest::Auto.resolve(&WITH_AMX, false).unwrap(),
            Compute::F32
        );
        let refused = CpuFeatures {
            amx_permitted: false,
            ..WITH_AMX
        };
        // vdpbf16ps is no faster than f32 FMA on Intel's cores: auto stays f32 there.
        assert_eq!(
            ComputeRequest::Auto.resolve(&refused, true).unwrap(),
            Compute::F32
        );
        assert_eq!(
            ComputeRequest::Bf16.resolve(&refused, true).unwrap(),
            Compute::Bf16
        );
        let err = ComputeRequest::Amx
            .resolve(&refused, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refused") && err.contains("ARCH_REQ_XCOMP_PERM"),
            "{err}"
        );
        let err = ComputeRequest::Amx
            .resolve(&WITH_BF16, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("amx_bf16") && err.contains("-amx_bf16"), "{err}");
        assert_eq!(
            ComputeRequest::available(&WITH_AMX),
            [Compute::F32, Compute::Bf16, Compute::Amx]
        );
        assert_eq!(ComputeRequest::available(&refused), [Compute::F32, Compute::Bf16]);
    }

    #[test]
    fn requests_parse_from_their_names() {
        for r in [
            ComputeRequest::F32,
            ComputeRequest::Bf16,
            ComputeRequest::Amx,
            ComputeRequest::Auto,
        ] {
            assert_eq!(r.to_string().parse::<ComputeRequest>().unwrap(), r);
        }
        assert!(
            "fp16"
                .parse::<ComputeRequest>()
                .unwrap_err()
                .contains("f32, bf16, amx or auto")
        );
    }
}
