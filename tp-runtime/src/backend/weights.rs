//! How each weight format is placed on each backend: the [`WeightFormat`] of dense weights
//! and of AWQ "gemm" weights, each choosing the [`LinearKernel`] that runs it per backend.
//! Adding a format (GPTQ, FP8, ...) adds a type, its kernels and its impl here; no backend
//! and no decoder code changes. Adding a backend adds one `place_…` method to each.

use checkpoint::AwqGemm;

use crate::Result;
use crate::backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaBackend;
use crate::backend::{DenseWeight, LinearKernel, WeightFormat};
use cpu_kernels::{CpuAwq, CpuMatrix};

impl WeightFormat for DenseWeight {
    fn format(&self) -> String {
        format!("dense {:?}", self.data.dtype())
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn in_features(&self) -> usize {
        self.cols
    }

    fn stored_bytes(&self) -> usize {
        self.data.byte_size()
    }

    fn stored_tensors(&self, prefix: &str, f: &mut dyn FnMut(&str, &[u8]) -> Result<()>) -> Result<()> {
        f(&format!("{prefix}.weight"), self.data.bytes())
    }

    fn place_cpu(self: Box<Self>, _: &CpuBackend) -> Result<Box<dyn LinearKernel<CpuBackend>>> {
        Ok(Box::new(CpuMatrix::new(self.data, self.rows, self.cols)?))
    }

    #[cfg(feature = "cuda")]
    fn place_cuda(self: Box<Self>, gpu: &CudaBackend) -> Result<Box<dyn LinearKernel<CudaBackend>>> {
        Ok(Box::new(gpu.dense_linear(*self)?))
    }
}

impl WeightFormat for AwqGemm {
    fn format(&self) -> String {
        format!("awq gemm g{}", self.shape.group_size)
    }

    fn out_features(&self) -> usize {
        self.shape.out_features
    }

    fn in_features(&self) -> usize {
        self.shape.in_features
    }

    fn stored_bytes(&self) -> usize {
        4 * (self.qweight.len() + self.qzeros.len()) + 2 * self.scales.len()
    }

    fn stored_tensors(&self, prefix: &str, f: &mut dyn FnMut(&str, &[u8]) -> Result<()>) -> Result<()> {
        let [qweight, qzeros, scales] = self.shape.tensors(prefix).map(|t| t.0);
        f(&qweight, bytemuck::cast_slice(&self.qweight))?;
        f(&qzeros, bytemuck::cast_slice(&self.qzeros))?;
        f(&scales, bytemuck::cast_slice(&self.scales))
    }

    fn place_cpu(self: Box<Self>, _: &CpuBackend) -> Result<Box<dyn LinearKernel<CpuBackend>>> {
        Ok(Box::new(CpuAwq::new(*self)))
    }

    #[cfg(feature = "cuda")]
    fn place_cuda(self: Box<Self>, gpu: &CudaBackend) -> Result<Box<dyn LinearKernel<CudaBackend>>> {
        Ok(Box::new(gpu.awq_linear(*self)?))
    }
}
