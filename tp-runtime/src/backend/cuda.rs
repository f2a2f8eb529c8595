//! The CUDA backend: our kernels (`cuda-kernels`, compiled with NVRTC for the device at
//! first use) and cuBLAS, behind the same trait as the CPU backend, whose operations are
//! every kernel's CPU twin. Activations stay f32 on the device (rounded to f16 or bf16 on
//! their way into a half-precision product); AWQ weights are repacked once at load into the
//! kernels' "mma" layout; dense weights keep their element type (f32 SGEMM, or f16/bf16
//! `gemm_ex` with f32 accumulation).

use std::sync::Arc;

use checkpoint::{Activation, AwqGemm, FloatData};
use cuda_kernels::Gpu;
use cuda_kernels::cudarc::driver::CudaSlice;
use cuda_kernels::gpu::{AwqDeviceWeight, GateActivation};
use cuda_kernels::layout::MmaLayout;
use half::{bf16, f16};

use super::{
    AttentionLayout, AttentionSpec, Backend, ByteSize, LinearKernel, Prediction, RopeFrequencies,
    check_copy_rows,
};
use crate::backend::{DenseWeight, WeightFormat};
use crate::{Error, Result};

/// f32 activations `[rows, cols]` on the device.
pub struct CudaTensor {
    pub data: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Dense values on the device, in the element type they were stored in.
pub enum DeviceFloat {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

/// A dense `[rows, cols]` matrix on the device: f32 weights multiply in f32 (cuBLAS SGEMM),
/// f16 and bf16 weights stay half precision and meet activations rounded to their type
/// (cuBLAS `gemm_ex`, f32 accumulation).
pub struct CudaMatrix {
    pub data: DeviceFloat,
    pub rows: usize,
    pub cols: usize,
}

impl CudaMatrix {
    /// `out[m, rows] = x[m, cols] · selfᵀ`.
    fn matmul(&self, gpu: &Gpu, x: &CudaSlice<f32>, m: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        let (n, k) = (self.rows, self.cols);
        match &self.data {
            DeviceFloat::F32(w) => gpu.sgemm_nt(x, w, out, m, k, n)?,
            DeviceFloat::F16(w) => {
                let mut x16 = gpu.zeros::<f16>(m * k)?;
                gpu.to_f16(x, &mut x16, m * k)?;
                gpu.half_gemm_nt_f32(&x16, w, out, m, k, n)?
            }
            DeviceFloat::BF16(w) => {
                let mut x16 = gpu.zeros::<bf16>(m * k)?;
                gpu.to_bf16(x, &mut x16, m * k)?;
                gpu.half_gemm_nt_f32(&x16, w, out, m, k, n)?
            }
        }
        Ok(())
    }
}

/// A 4-bit AWQ weight on the device, repacked into the kernels' "mma" layout.
pub struct CudaAwq(AwqDeviceWeight);

impl CudaAwq {
    /// The weight's device buffers, for launching a particular kernel (tests, benchmarks).
    pub fn device(&self) -> &AwqDeviceWeight {
        &self.0
    }
}

/// A vector on the device.
pub struct CudaVector {
    pub data: CudaSlice<f32>,
}

impl ByteSize for CudaMatrix {
    fn byte_size(&self) -> usize {
        let element = match self.data {
            DeviceFloat::F32(_) => 4,
            DeviceFloat::F16(_) | DeviceFloat::BF16(_) => 2,
        };
        self.rows * self.cols * element
    }
}

impl ByteSize for CudaVector {
    fn byte_size(&self) -> usize {
        self.data.len() * 4
    }
}

fn check_linear(x: &CudaTensor, out: &CudaTensor, out_features: usize, in_features: usize) -> Result<()> {
    if x.cols != in_features || (out.rows, out.cols) != (x.rows, out_features) {
        return Err(Error::Invalid(format!(
            "linear [{out_features}, {in_features}]: input [{}, {}], output [{}, {}]",
            x.rows, x.cols, out.rows, out.cols
        )));
    }
    Ok(())
}

impl LinearKernel<CudaBackend> for CudaMatrix {
    fn out_features(&self) -> usize {
        self.rows
    }

    fn in_features(&self) -> usize {
        self.cols
    }

    fn byte_size(&self) -> usize {
        ByteSize::byte_size(self)
    }

    fn forward_into(&self, backend: &CudaBackend, x: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        check_linear(x, out, self.rows, self.cols)?;
        self.matmul(&backend.gpu, &x.data, x.rows, &mut out.data)
    }
}

impl LinearKernel<CudaBackend> for CudaAwq {
    fn out_features(&self) -> usize {
        self.0.out_features
    }

    fn in_features(&self) -> usize {
        self.0.in_features
    }

    fn byte_size(&self) -> usize {
        self.0.byte_size()
    }

    fn forward_into(&self, backend: &CudaBackend, x: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        check_linear(x, out, self.0.out_features, self.0.in_features)?;
        // W4A16: the activations go in as f16, as in AutoAWQ's and vLLM's kernels.
        let gpu = &backend.gpu;
        let n = x.rows * x.cols;
        let mut x16 = gpu.zeros::<f16>(n)?;
        gpu.to_f16(&x.data, &mut x16, n)?;
        gpu.w4a16(&x16, &self.0, &mut out.data, x.rows)?;
        Ok(())
    }
}

/// Runs on one GPU.
#[derive(Clone)]
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    /// Fill every output with NaN before its kernel runs, so that unwritten elements show.
    poison: bool,
}

impl CudaBackend {
    /// The backend on GPU `ordinal`; "no CUDA driver found" and the like where there is
    /// none, never a panic.
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(CudaBackend {
            gpu: Gpu::get(ordinal)?,
            poison: false,
        })
    }

    /// The same backend, poisoning outputs (for kernel tests).
    pub fn with_poisoned_outputs(mut self) -> Self {
        self.poison = true;
        self
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn output(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        let n = rows * cols;
        let data = if self.poison {
            self.gpu.filled(n, f32::NAN)?
        } else {
            self.gpu.zeros::<f32>(n)?
        };
        Ok(CudaTensor { data, rows, cols })
    }

    fn same_dims(what: &str, a: &CudaTensor, b: &CudaTensor) -> Result<()> {
        if (a.rows, a.cols) != (b.rows, b.cols) {
            return Err(Error::Invalid(format!(
                "{what}: shapes [{}, {}] and [{}, {}] differ",
                a.rows, a.cols, b.rows, b.cols
            )));
        }
        Ok(())
    }

    /// Places a dense weight, keeping its element type.
    pub fn dense_linear(&self, weight: DenseWeight) -> Result<CudaMatrix> {
        let data = match &weight.data {
            FloatData::F32(d) => DeviceFloat::F32(self.gpu.upload(d)?),
            FloatData::F16(d) => DeviceFloat::F16(self.gpu.upload(d)?),
            FloatData::BF16(d) => DeviceFloat::BF16(self.gpu.upload(d)?),
        };
        Ok(CudaMatrix {
            data,
            rows: weight.rows,
            cols: weight.cols,
        })
    }

    /// Places an AWQ weight, repacked into the kernels' "mma" layout.
    pub fn awq_linear(&self, weight: AwqGemm) -> Result<CudaAwq> {
        let shape = weight.shape;
        let layout = MmaLayout::from_gemm(
            bytemuck::cast_slice::<i32, u32>(&weight.qweight),
            bytemuck::cast_slice::<i32, u32>(&weight.qzeros),
            bytemuck::cast_slice::<f16, u16>(&weight.scales),
            shape.in_features,
            shape.out_features,
            shape.group_size,
        )?;
        Ok(CudaAwq(AwqDeviceWeight::upload(&self.gpu, &layout)?))
    }

    /// `[rows.len(), vocab]` logits of the selected rows, on the device.
    fn logits_rows(&self, hidden: &CudaTensor, lm_head: &CudaMatrix, rows: &[usize]) -> Result<CudaTensor> {
        if hidden.cols != lm_head.cols {
            return Err(Error::Invalid(format!(
                "lm_head expects {} features, hidden states have {}",
                lm_head.cols, hidden.cols
            )));
        }
        let index: Vec<u32> = rows
            .iter()
            .map(|&r| u32::try_from(r).unwrap_or(u32::MAX))
            .collect();
        let mut x = self.output(rows.len(), hidden.cols)?;
        self.gpu
            .gather_rows(&hidden.data, hidden.rows, &index, &mut x.data, hidden.cols)?;
        let mut logits = self.output(rows.len(), lm_head.rows)?;
        lm_head.matmul(&self.gpu, &x.data, rows.len(), &mut logits.data)?;
        Ok(logits)
    }
}

/// Rows per lm_head product when scoring: bounds the logits on the device.
const NLL_CHUNK_ROWS: usize = 1024;

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Buffer = CudaSlice<f32>;
    type Matrix = CudaMatrix;
    type Vector = CudaVector;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.gpu.ordinal(), self.gpu.name())
    }

    fn matrix(&self, weight: DenseWeight) -> Result<CudaMatrix> {
        self.dense_linear(weight)
    }

    fn vector(&self, data: FloatData) -> Result<CudaVector> {
        Ok(CudaVector {
            data: self.gpu.upload(&data.into_f32())?,
        })
    }

    fn linear(&self, weight: Box<dyn WeightFormat>) -> Result<Box<dyn LinearKernel<Self>>> {
        weight.place_cuda(self)
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        self.output(rows, cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            data: self.gpu.zeros::<f32>(rows * cols)?,
            rows,
            cols,
        })
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "{} values do not make a [{rows}, {cols}] tensor",
                data.len()
            )));
        }
        Ok(CudaTensor {
            data: self.gpu.upload(data)?,
            rows,
            cols,
        })
    }

    fn download(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let mut v = self.gpu.download(&x.data)?;
        v.truncate(x.rows * x.cols);
        Ok(v)
    }

    fn dims(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn buffer<'a>(&self, x: &'a CudaTensor) -> &'a CudaSlice<f32> {
        &x.data
    }

    fn buffer_mut<'a>(&self, x: &'a mut CudaTensor) -> &'a mut CudaSlice<f32> {
        &mut x.data
    }

    fn embed_into(
        &self,
        table: &CudaMatrix,
        ids: &[u32],
        first_id: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if (out.rows, out.cols) != (ids.len(), table.cols) {
            return Err(Error::Invalid(format!(
                "embed: {} ids of {} features into [{}, {}]",
                ids.len(),
                table.cols,
                out.rows,
                out.cols
            )));
        }
        let ids_dev = self.gpu.upload(ids)?;
        let (rows, cols) = (table.rows, table.cols);
        match &table.data {
            DeviceFloat::F32(t) => {
                self.gpu
                    .embed(t, rows, &ids_dev, &mut out.data, ids.len(), cols, first_id)?
            }
            DeviceFloat::F16(t) => {
                self.gpu
                    .embed(t, rows, &ids_dev, &mut out.data, ids.len(), cols, first_id)?
            }
            DeviceFloat::BF16(t) => {
                self.gpu
                    .embed(t, rows, &ids_dev, &mut out.data, ids.len(), cols, first_id)?
            }
        }
        Ok(())
    }

    fn head_rms_norm(
        &self,
        x: &mut CudaTensor,
        weight: &CudaVector,
        eps: f32,
        head_dim: usize,
    ) -> Result<()> {
        if head_dim == 0 || !x.cols.is_multiple_of(head_dim) {
            return Err(Error::Invalid(format!(
                "head_rms_norm: heads of {head_dim} in rows of {}",
                x.cols
            )));
        }
        // The row kernel over one head per row: [rows × heads, head_dim].
        let heads = x.rows * (x.cols / head_dim);
        let mut out = self.gpu.zeros::<f32>(x.rows * x.cols)?;
        self.gpu
            .rms_norm(&x.data, &weight.data, &mut out, heads, head_dim, eps)?;
        x.data = out;
        Ok(())
    }

    fn rms_norm_into(
        &self,
        x: &CudaTensor,
        weight: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        Self::same_dims("rms_norm", x, out)?;
        self.gpu
            .rms_norm(&x.data, &weight.data, &mut out.data, x.rows, x.cols, eps)?;
        Ok(())
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaVector) -> Result<()> {
        self.gpu.add_bias(&mut x.data, &bias.data, x.rows, x.cols)?;
        Ok(())
    }

    fn rope_table(&self, rope: &RopeFrequencies, positions: &[u32]) -> Result<CudaTensor> {
        self.upload(&rope.table(positions), positions.len(), rope.head_dim)
    }

    fn rotary(&self, x: &mut CudaTensor, table: &CudaTensor, head_dim: usize) -> Result<()> {
        if table.rows != x.rows || table.cols > head_dim {
            return Err(Error::Invalid(format!(
                "rotary: table [{}, {}] for activations [{}, {}] with head_dim {head_dim}",
                table.rows, table.cols, x.rows, x.cols
            )));
        }
        self.gpu
            .rotary(&mut x.data, &table.data, x.rows, x.cols, head_dim, table.cols)?;
        Ok(())
    }

    fn attention_into(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        spec: &AttentionSpec,
        layout: &AttentionLayout,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let rows = layout.rows();
        let d = spec.head_dim;
        // The kernel trusts every key row it is given: the store must hold them all.
        let key_rows = k.rows.max(layout.key_rows());
        for (name, t, expected_rows, cols) in [
            ("q", q, rows, spec.heads * d),
            ("k", k, key_rows, spec.kv_heads * d),
            ("v", v, key_rows, spec.kv_heads * d),
            ("output", &*out, rows, spec.heads * d),
        ] {
            if t.rows != expected_rows || t.cols != cols {
                return Err(Error::Invalid(format!(
                    "attention: {name} is [{}, {}], expected [{expected_rows}, {cols}]",
                    t.rows, t.cols
                )));
            }
        }
        let (key_base, positions) = layout.per_row();
        let key_base = self.gpu.upload(&key_base)?;
        let positions = self.gpu.upload(&positions)?;
        self.gpu.attention(
            &q.data,
            &k.data,
            &v.data,
            &mut out.data,
            &key_base,
            &positions,
            rows,
            key_rows,
            spec.heads,
            spec.kv_heads,
            d,
            spec.scale,
            spec.softcap,
            spec.sliding_window,
        )?;
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &CudaTensor,
        src_row: usize,
        dst: &mut CudaTensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        check_copy_rows((src.rows, src.cols), src_row, (dst.rows, dst.cols), dst_row, rows)?;
        let cols = src.cols;
        self.gpu.copy_within(
            &src.data,
            src_row * cols,
            &mut dst.data,
            dst_row * cols,
            rows * cols,
        )?;
        Ok(())
    }

    fn gate_mul_into(
        &self,
        activation: Activation,
        gate: &CudaTensor,
        up: &CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        Self::same_dims("gate_mul", gate, up)?;
        Self::same_dims("gate_mul", gate, out)?;
        let n = gate.rows * gate.cols;
        let kernel = match activation {
            Activation::Silu => GateActivation::Silu,
            Activation::GeluTanh => GateActivation::GeluTanh,
        };
        self.gpu
            .gate_mul(kernel, &gate.data, &up.data, &mut out.data, n)?;
        Ok(())
    }

    fn scale(&self, x: &mut CudaTensor, factor: f32) -> Result<()> {
        self.gpu.scale(&mut x.data, factor, x.rows * x.cols)?;
        Ok(())
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        Self::same_dims("add", x, y)?;
        self.gpu.add_assign(&mut x.data, &y.data, x.rows * x.cols)?;
        Ok(())
    }

    fn nll_parts(
        &self,
        hidden: &CudaTensor,
        lm_head: &CudaMatrix,
        predictions: &[Prediction],
        first_id: usize,
        softcap: Option<f32>,
    ) -> Result<CudaTensor> {
        let mut parts = Vec::with_capacity(predictions.len() * 3);
        for chunk in predictions.chunks(NLL_CHUNK_ROWS) {
            let rows: Vec<usize> = chunk.iter().map(|p| p.row).collect();
            let logits = self.logits(hidden, lm_head, &rows, softcap)?;
            let targets: Vec<u32> = chunk.iter().map(|p| p.target).collect();
            let targets = self.gpu.upload(&targets)?;
            let mut out = self.output(chunk.len(), 3)?;
            self.gpu.nll_parts(
                &logits.data,
                &targets,
                &mut out.data,
                chunk.len(),
                lm_head.rows,
                first_id,
            )?;
            parts.extend(self.download(&out)?);
        }
        self.upload(&parts, predictions.len(), 3)
    }

    fn logits(
        &self,
        hidden: &CudaTensor,
        lm_head: &CudaMatrix,
        rows: &[usize],
        softcap: Option<f32>,
    ) -> Result<CudaTensor> {
        let mut logits = self.logits_rows(hidden, lm_head, rows)?;
        if let Some(cap) = softcap {
            let n = logits.rows * logits.cols;
            self.gpu.softcap(&mut logits.data, cap, n)?;
        }
        Ok(logits)
    }
}
