//! The CUDA backend: our kernels (`cuda-kernels`, compiled with NVRTC for the device at
//! first use) and cuBLAS, behind the same trait as the CPU backend, whose operations are
//! every kernel's CPU twin. Activations stay f32 on the device (rounded to f16 on their way
//! into a W4A16 product); AWQ weights are repacked once at load into the kernels' "mma"
//! layout; dense weights are f32 (cuBLAS SGEMM).

use std::sync::Arc;

use cuda_kernels::cudarc::driver::CudaSlice;
use cuda_kernels::gpu::AwqDeviceWeight;
use cuda_kernels::layout::MmaLayout;
use cuda_kernels::{Gpu, KernelError};
use half::f16;

use super::{AttentionSpec, Backend, ByteSize, LinearWeight, Prediction, RopeFrequencies, SeqLayout};
use crate::checkpoint::F32Data;
use crate::{Error, Result};

impl From<KernelError> for Error {
    fn from(e: KernelError) -> Self {
        Error::Device(e.to_string())
    }
}

/// f32 activations `[rows, cols]` on the device.
pub struct CudaTensor {
    pub data: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// A dense `[rows, cols]` f32 matrix on the device.
pub struct CudaMatrix {
    pub data: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// A linear layer's weight on the device.
pub enum CudaLinear {
    Dense(CudaMatrix),
    Awq(AwqDeviceWeight),
}

/// A vector on the device.
pub struct CudaVector {
    pub data: CudaSlice<f32>,
}

impl ByteSize for CudaMatrix {
    fn byte_size(&self) -> usize {
        self.rows * self.cols * 4
    }
}

impl ByteSize for CudaLinear {
    fn byte_size(&self) -> usize {
        match self {
            CudaLinear::Dense(m) => m.byte_size(),
            CudaLinear::Awq(w) => w.byte_size(),
        }
    }
}

impl ByteSize for CudaVector {
    fn byte_size(&self) -> usize {
        self.data.len() * 4
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

    /// `[rows.len(), vocab]` logits of the selected rows, on the device.
    fn logits_rows(&self, hidden: &CudaTensor, lm_head: &CudaMatrix, rows: &[usize]) -> Result<CudaTensor> {
        if hidden.cols != lm_head.cols {
            return Err(Error::Invalid(format!(
                "lm_head expects {} features, hidden states have {}",
                lm_head.cols, hidden.cols
            )));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= hidden.rows) {
            return Err(Error::Invalid(format!("row {r} of {} requested", hidden.rows)));
        }
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let index = self.gpu.upload(&index)?;
        let mut x = self.output(rows.len(), hidden.cols)?;
        self.gpu.gather_rows(
            &hidden.data,
            hidden.rows,
            &index,
            &mut x.data,
            rows.len(),
            hidden.cols,
        )?;
        let mut logits = self.output(rows.len(), lm_head.rows)?;
        self.gpu.sgemm_nt(
            &x.data,
            &lm_head.data,
            &mut logits.data,
            rows.len(),
            hidden.cols,
            lm_head.rows,
        )?;
        Ok(logits)
    }
}

/// Rows per lm_head product when scoring: bounds the logits on the device.
const NLL_CHUNK_ROWS: usize = 1024;

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Buffer = CudaSlice<f32>;
    type Matrix = CudaMatrix;
    type Linear = CudaLinear;
    type Vector = CudaVector;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.gpu.ordinal(), self.gpu.name())
    }

    fn matrix(&self, data: F32Data, rows: usize, cols: usize) -> Result<CudaMatrix> {
        if data.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "{} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(CudaMatrix {
            data: self.gpu.upload(&data)?,
            rows,
            cols,
        })
    }

    fn linear(&self, weight: LinearWeight) -> Result<CudaLinear> {
        match weight {
            LinearWeight::Dense {
                data,
                out_features,
                in_features,
            } => Ok(CudaLinear::Dense(self.matrix(data, out_features, in_features)?)),
            LinearWeight::Awq(w) => {
                w.validate()?;
                // The scales were f16 in the checkpoint: converting back is exact.
                let scales: Vec<u16> = w.scales.iter().map(|&s| f16::from_f32(s).to_bits()).collect();
                let layout = MmaLayout::from_gemm(
                    bytemuck::cast_slice::<i32, u32>(&w.qweight),
                    bytemuck::cast_slice::<i32, u32>(&w.qzeros),
                    &scales,
                    w.in_features,
                    w.out_features,
                    w.group_size,
                )?;
                Ok(CudaLinear::Awq(AwqDeviceWeight::upload(&self.gpu, &layout)?))
            }
        }
    }

    fn vector(&self, data: F32Data) -> Result<CudaVector> {
        Ok(CudaVector {
            data: self.gpu.upload(&data)?,
        })
    }

    fn tensor(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
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

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
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

    fn embed(&self, table: &CudaMatrix, ids: &[u32], first_id: usize) -> Result<CudaTensor> {
        let mut out = self.output(ids.len(), table.cols)?;
        let ids_dev = self.gpu.upload(ids)?;
        self.gpu.embed(
            &table.data,
            table.rows,
            &ids_dev,
            &mut out.data,
            ids.len(),
            table.cols,
            first_id,
        )?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaVector, eps: f32) -> Result<CudaTensor> {
        let mut y = self.output(x.rows, x.cols)?;
        self.gpu
            .rms_norm(&x.data, &weight.data, &mut y.data, x.rows, x.cols, eps)?;
        Ok(y)
    }

    fn linear_forward(
        &self,
        x: &CudaTensor,
        weight: &CudaLinear,
        bias: Option<&CudaVector>,
    ) -> Result<CudaTensor> {
        let (out_features, in_features) = match weight {
            CudaLinear::Dense(m) => (m.rows, m.cols),
            CudaLinear::Awq(w) => (w.out_features, w.in_features),
        };
        if x.cols != in_features {
            return Err(Error::Invalid(format!(
                "linear: input has {} features, weight expects {in_features}",
                x.cols
            )));
        }
        let mut y = self.output(x.rows, out_features)?;
        match weight {
            CudaLinear::Dense(m) => {
                self.gpu
                    .sgemm_nt(&x.data, &m.data, &mut y.data, x.rows, in_features, out_features)?
            }
            CudaLinear::Awq(w) => {
                // W4A16: the activations go in as f16, as in AutoAWQ's and vLLM's kernels.
                let n = x.rows * x.cols;
                let mut x16 = self.gpu.zeros::<f16>(n)?;
                self.gpu.to_f16(&x.data, &mut x16, n)?;
                self.gpu.w4a16(&x16, w, &mut y.data, x.rows)?
            }
        }
        if let Some(b) = bias {
            self.gpu.add_bias(&mut y.data, &b.data, x.rows, out_features)?;
        }
        Ok(y)
    }

    fn rope_table(&self, rope: &RopeFrequencies, positions: &[u32]) -> Result<CudaTensor> {
        self.tensor(&rope.table(positions), positions.len(), rope.head_dim)
    }

    fn rotary(&self, x: &mut CudaTensor, table: &CudaTensor, head_dim: usize) -> Result<()> {
        if table.rows != x.rows || table.cols != head_dim {
            return Err(Error::Invalid(format!(
                "rotary: table [{}, {}] for activations [{}, {}] with head_dim {head_dim}",
                table.rows, table.cols, x.rows, x.cols
            )));
        }
        self.gpu
            .rotary(&mut x.data, &table.data, x.rows, x.cols, head_dim)?;
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        spec: &AttentionSpec,
        layout: &SeqLayout,
    ) -> Result<CudaTensor> {
        let rows = layout.rows();
        let d = spec.head_dim;
        for (name, t, cols) in [
            ("q", q, spec.heads * d),
            ("k", k, spec.kv_heads * d),
            ("v", v, spec.kv_heads * d),
        ] {
            if t.rows != rows || t.cols != cols {
                return Err(Error::Invalid(format!(
                    "attention: {name} is [{}, {}], expected [{rows}, {cols}]",
                    t.rows, t.cols
                )));
            }
        }
        let starts: Vec<u32> = layout
            .sequences()
            .flat_map(|s| std::iter::repeat_n(s.start as u32, s.len()))
            .collect();
        let starts = self.gpu.upload(&starts)?;
        let mut out = self.output(rows, spec.heads * d)?;
        self.gpu.attention(
            &q.data,
            &k.data,
            &v.data,
            &mut out.data,
            &starts,
            rows,
            spec.heads,
            spec.kv_heads,
            d,
            spec.scale,
            spec.sliding_window,
        )?;
        Ok(out)
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        Self::same_dims("silu_mul", gate, up)?;
        let mut y = self.output(gate.rows, gate.cols)?;
        self.gpu
            .silu_mul(&gate.data, &up.data, &mut y.data, gate.rows * gate.cols)?;
        Ok(y)
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
    ) -> Result<CudaTensor> {
        let mut parts = Vec::with_capacity(predictions.len() * 3);
        for chunk in predictions.chunks(NLL_CHUNK_ROWS) {
            let rows: Vec<usize> = chunk.iter().map(|p| p.row).collect();
            let logits = self.logits_rows(hidden, lm_head, &rows)?;
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
            parts.extend(self.to_host(&out)?);
        }
        self.tensor(&parts, predictions.len(), 3)
    }

    fn logits(&self, hidden: &CudaTensor, lm_head: &CudaMatrix, rows: &[usize]) -> Result<CudaTensor> {
        self.logits_rows(hidden, lm_head, rows)
    }
}
