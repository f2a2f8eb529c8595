//! Linear weights as read from a checkpoint, and how each format is placed on each backend.
//!
//! A format is a type implementing [`WeightFormat`]: it knows its shape and, per backend, which
//! [`LinearKernel`] runs it. Adding a format (GPTQ, FP8, ...) adds a type and its kernels; no
//! backend and no decoder code changes. Adding a backend adds one `place_…` method here.

use std::fmt;

use checkpoint::{AwqGemm, FloatData};

use crate::backend::LinearKernel;
use crate::backend::cpu::{CpuAwq, CpuBackend, CpuMatrix};
#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaBackend;
use crate::{Error, Result};

/// A dense `[rows, cols]` weight (PyTorch layout: `[out_features, in_features]` for a linear)
/// in the element type it is stored in.
#[derive(Clone, Debug)]
pub struct DenseWeight {
    pub data: FloatData,
    pub rows: usize,
    pub cols: usize,
}

impl DenseWeight {
    /// Wraps `data` as `[rows, cols]`.
    pub fn new(data: FloatData, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "{} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(DenseWeight { data, rows, cols })
    }

    /// An f32 `[rows, cols]` weight from owned values.
    pub fn f32(values: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        Self::new(FloatData::from(values), rows, cols)
    }
}

/// A linear layer's weight in one storage format, before a backend lays it out.
pub trait WeightFormat: Send + fmt::Debug {
    /// The format's name in messages ("dense f16", "awq gemm").
    fn format(&self) -> String;
    /// Output features.
    fn out_features(&self) -> usize;
    /// Input features.
    fn in_features(&self) -> usize;
    /// Bytes of the weight as stored (what was read from the checkpoint).
    fn stored_bytes(&self) -> usize;
    /// Shows `f` each stored tensor of the weight, named from `prefix` (`…q_proj`), with its
    /// little-endian bytes: what a checkpoint of this share holds.
    fn stored_tensors(&self, prefix: &str, f: &mut dyn FnMut(&str, &[u8]) -> Result<()>) -> Result<()>;
    /// The CPU kernel for this weight.
    fn place_cpu(self: Box<Self>, cpu: &CpuBackend) -> Result<Box<dyn LinearKernel<CpuBackend>>>;
    /// The CUDA kernel for this weight.
    #[cfg(feature = "cuda")]
    fn place_cuda(self: Box<Self>, gpu: &CudaBackend) -> Result<Box<dyn LinearKernel<CudaBackend>>>;
}

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
        Ok(Box::new(CpuMatrix::new(*self)))
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
