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
    /// bf16 operands, f32 accumulation; an error where the CPU has no native bf16 product.
    Bf16,
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
            "auto" => Ok(ComputeRequest::Auto),
            other => Err(format!("compute must be f32, bf16 or auto, not {other:?}")),
        }
    }
}

impl fmt::Display for ComputeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComputeRequest::F32 => "f32",
            ComputeRequest::Bf16 => "bf16",
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
}

impl Compute {
    /// The kernel, as reports and `awq bench` print it.
    pub fn kernel(self) -> &'static str {
        match self {
            Compute::F32 => "f32 (gemm, fma)",
            Compute::Bf16 => "bf16 (gemmkit, avx512-bf16 vdpbf16ps, f32 accumulation)",
        }
    }
}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
        })
    }
}

/// The CPU features that decide the compute path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    /// `vdpbf16ps`: bf16 pairs multiplied and accumulated into f32 at twice the f32 rate.
    pub avx512_bf16: bool,
    /// Intel's tile unit (Sapphire Rapids and later). Detected and reported; no kernel of ours
    /// uses it yet.
    pub amx_bf16: bool,
}

impl CpuFeatures {
    /// The features of the CPU this process runs on.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID.(EAX=7, ECX=0):EDX bit 22 is AMX-BF16 (leaf 7 exists on every CPU with
            // AVX2).
            let amx_bf16 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 22) != 0;
            CpuFeatures {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
                amx_bf16,
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

impl ComputeRequest {
    /// Whether this is the default, `auto`.
    pub fn is_auto(&self) -> bool {
        *self == ComputeRequest::Auto
    }

    /// The path that runs on a CPU with `features`; `sixteen_bit_work` says whether `auto`
    /// should take 16 bits (AWQ weights, a 16-bit checkpoint, the scale search).
    pub fn resolve(self, features: &CpuFeatures, sixteen_bit_work: bool) -> Result<Compute> {
        match self {
            ComputeRequest::F32 => Ok(Compute::F32),
            ComputeRequest::Bf16 if features.has_bf16() => Ok(Compute::Bf16),
            ComputeRequest::Bf16 => Err(Error::Invalid(format!(
                "compute = bf16 needs the CPU feature avx512_bf16 (vdpbf16ps), which this CPU lacks \
                 (it has: {features}); use compute = f32 or auto"
            ))),
            ComputeRequest::Auto if sixteen_bit_work && features.has_bf16() => Ok(Compute::Bf16),
            ComputeRequest::Auto => Ok(Compute::F32),
        }
    }

    /// [`resolve`](Self::resolve) against this CPU.
    pub fn resolve_here(self, sixteen_bit_work: bool) -> Result<Compute> {
        self.resolve(&CpuFeatures::detect(), sixteen_bit_work)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_BF16: CpuFeatures = CpuFeatures {
        avx2: true,
        fma: true,
        avx512f: true,
        avx512_bf16: true,
        amx_bf16: false,
    };
    const WITHOUT_BF16: CpuFeatures = CpuFeatures {
        avx512_bf16: false,
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
    fn requests_parse_from_their_names() {
        for r in [ComputeRequest::F32, ComputeRequest::Bf16, ComputeRequest::Auto] {
            assert_eq!(r.to_string().parse::<ComputeRequest>().unwrap(), r);
        }
        assert!(
            "fp16"
                .parse::<ComputeRequest>()
                .unwrap_err()
                .contains("f32, bf16 or auto")
        );
    }
}
