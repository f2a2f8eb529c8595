//! One CUDA device: context, stream, the compiled modules (cached per device, compiled with
//! NVRTC at first use for the device's own architecture), cuBLAS, and a safe wrapper per
//! kernel that checks buffer sizes before launching.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use half::{bf16, f16};

use crate::compile::{arch_names, nvrtc_available, ptx};
use crate::launch::{
    DEQUANT_MIN_ROWS, FusedKernel, GEMV_MAX_ROWS, W4a16Path, WARPS, dequant_blocks, fused_launch,
};
use crate::layout::{self, MmaLayout};
use crate::source::module_of;
use crate::{KernelError, Result};

/// Whether a CUDA driver and at least one device are present; an error saying which is
/// missing otherwise. Safe to call anywhere: no CUDA function is called unless the driver
/// library loads.
pub fn cuda_available() -> Result<usize> {
    // SAFETY: only tries to load the shared library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::NoDriver);
    }
    let n = CudaContext::device_count()?;
    if n < 1 {
        return Err(KernelError::NoDevice(0, n));
    }
    Ok(n as usize)
}

/// A 4-bit AWQ weight on the device, in the "mma" layout ([`MmaLayout`]).
pub struct AwqDeviceWeight {
    pub qweight: CudaSlice<u32>,
    pub zeros: CudaSlice<u32>,
    /// f16 bits.
    pub scales: CudaSlice<u16>,
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
}

impl AwqDeviceWeight {
    /// Uploads a repacked weight.
    pub fn upload(gpu: &Gpu, layout: &MmaLayout) -> Result<Self> {
        Ok(AwqDeviceWeight {
            qweight: gpu.upload(&layout.qweight)?,
            zeros: gpu.upload(&layout.zeros)?,
            scales: gpu.upload(&layout.scales)?,
            in_features: layout.in_features,
            out_features: layout.out_features,
            group_size: layout.group_size,
        })
    }

    /// Bytes on the device.
    pub fn byte_size(&self) -> usize {
        self.qweight.len() * 4 + self.zeros.len() * 4 + self.scales.len() * 2
    }
}

/// Where a W4A16 product writes.
pub enum W4a16Out<'a> {
    F32(&'a mut CudaSlice<f32>),
    F16(&'a mut CudaSlice<f16>),
}

/// An element type an embedding table can be stored in on the device.
pub trait TableElement: DeviceRepr {
    /// The kernel that embeds from such a table.
    const EMBED: &'static str;
}

impl TableElement for f32 {
    const EMBED: &'static str = "embed";
}
impl TableElement for f16 {
    const EMBED: &'static str = "embed_f16";
}
impl TableElement for bf16 {
    const EMBED: &'static str = "embed_bf16";
}

/// A 16-bit float type cuBLAS multiplies.
pub trait HalfElement: DeviceRepr {
    /// cuBLAS's name of the type.
    const CUDA_TYPE: cudarc::cublas::sys::cudaDataType;
}

impl HalfElement for f16 {
    const CUDA_TYPE: cudarc::cublas::sys::cudaDataType = cudarc::cublas::sys::cudaDataType::CUDA_R_16F;
}
impl HalfElement for bf16 {
    const CUDA_TYPE: cudarc::cublas::sys::cudaDataType = cudarc::cublas::sys::cudaDataType::CUDA_R_16BF;
}

/// An error naming the first row index that is not below `rows`: a gather never reads past
/// its source.
pub fn check_row_indices(indices: &[u32], rows: usize) -> Result<()> {
    match indices.iter().position(|&r| r as usize >= rows) {
        None => Ok(()),
        Some(i) => Err(KernelError::Shape(format!(
            "gather: row index {} at position {i} is outside the {rows} rows of the source",
            indices[i]
        ))),
    }
}

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels.
const ELEM_THREADS: u32 = 256;
/// Dynamic shared memory the W4A16 kernels may use.
const MMA_MAX_SHARED: usize = 96 << 10;

/// The activation of a gated MLP's gate, as the elementwise kernels name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateActivation {
    /// `silu_mul`.
    Silu,
    /// `gelu_tanh_mul` (GELU's tanh approximation).
    GeluTanh,
}

/// One device and everything compiled for it.
pub struct Gpu {
    ordinal: usize,
    name: String,
    arch: String,
    multiprocessors: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    workspace: Mutex<Workspace>,
}

/// Scratch buffers reused across launches (every launch is on the one stream, so a buffer
/// is free again as soon as the next launch is queued).
struct Workspace {
    /// Split-K partial sums.
    partial: CudaSlice<f32>,
    /// Per-tile arrival counters of the split-K reduction; every kernel leaves them zero.
    counters: CudaSlice<u32>,
    /// A dequantized f16 weight.
    weight: CudaSlice<f16>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({} {}, {})", self.ordinal, self.name, self.arch)
    }
}

fn elems(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(ELEM_THREADS).max(1), 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn expect_len<T>(what: &str, buf: &CudaSlice<T>, want: usize) -> Result<()> {
    if buf.len() < want {
        return Err(KernelError::Shape(format!(
            "{what}: buffer of {} elements, {want} needed",
            buf.len()
        )));
    }
    Ok(())
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| KernelError::Shape(format!("{what} = {v} exceeds the kernels' 32-bit indices")))
}

impl Gpu {
    /// Device `ordinal`, opened once per process and shared: its compiled kernels are cached.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut devices = devices.lock().expect("device registry lock");
        if let Some(gpu) = devices.get(&ordinal) {
            return Ok(Arc::clone(gpu));
        }
        let count = cuda_available()?;
        if ordinal >= count {
            return Err(KernelError::NoDevice(ordinal, count as i32));
        }
        if !nvrtc_available() {
            return Err(KernelError::MissingLibrary("NVRTC"));
        }
        // SAFETY: only tries to load the shared library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::MissingLibrary("cuBLAS"));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        // A stream of our own: the legacy default stream cannot be captured into a CUDA
        // graph. Every operation on this device goes through this one stream, so cudarc's
        // per-buffer events (which a capture would also have to contain) order nothing.
        // SAFETY: no buffer of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(Arc::clone(&stream))?;
        let workspace = Workspace {
            partial: stream.alloc_zeros::<f32>(1)?,
            counters: stream.alloc_zeros::<u32>(1)?,
            weight: stream.alloc_zeros::<f16>(1)?,
        };
        let gpu = Arc::new(Gpu {
            ordinal,
            name: ctx.name()?,
            arch: arch_names(major, minor).0,
            multiprocessors,
            ctx,
            stream,
            blas,
            functions: Mutex::new(HashMap::new()),
            workspace: Mutex::new(workspace),
        });
        devices.insert(ordinal, Arc::clone(&gpu));
        Ok(gpu)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The architecture kernels are compiled for (`compute_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The stream every kernel runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compiles (once) the module defining `entry` and returns the function.
    fn function(&self, entry: &'static str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().expect("function cache lock");
        if let Some(f) = functions.get(entry) {
            return Ok(f.clone());
        }
        let source = module_of(entry).ok_or_else(|| KernelError::Shape(format!("no kernel `{entry}`")))?;
        let module = self.ctx.load_module(ptx(source, &self.arch)?)?;
        for &e in source.entries {
            let f = module.load_function(e)?;
            if e.starts_with("w4a16_mma") {
                // Their cp.async pipelines need more than the default 48 KiB.
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    MMA_MAX_SHARED as i32,
                )?;
            }
            functions.insert(e, f);
        }
        Ok(functions[entry].clone())
    }

    /// Copies host values to the device.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copies `n` values from `src[src_at..]` to `dst[dst_at..]` on the device.
    pub fn copy_within<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        src_at: usize,
        dst: &mut CudaSlice<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        if src_at + n > src.len() || dst_at + n > dst.len() {
            return Err(KernelError::Shape(format!(
                "copy of {n} values from {src_at} of {} to {dst_at} of {}",
                src.len(),
                dst.len()
            )));
        }
        if n > 0 {
            self.stream.memcpy_dtod(
                &src.slice(src_at..src_at + n),
                &mut dst.slice_mut(dst_at..dst_at + n),
            )?;
        }
        Ok(())
    }

    /// Copies device values to the host.
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(dev)?)
    }

    /// `n` zeros on the device.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }

    /// `n` floats on the device, every one `value` (NaN poisons outputs in tests).
    pub fn filled(&self, n: usize, value: f32) -> Result<CudaSlice<f32>> {
        let mut x = self.zeros::<f32>(n)?;
        let f = self.function("fill")?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut x).arg(&value).arg(&n64);
        // SAFETY: x holds n floats; the kernel writes indices below n.
        unsafe { b.launch(elems(n)) }?;
        Ok(x)
    }

    /// Waits for every queued kernel.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// `y[r] = w · x[r] / rms(x[r])`. CPU twin: `CpuBackend::rms_norm`.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        expect_len("rms_norm x", x, rows * cols)?;
        expect_len("rms_norm weight", w, cols)?;
        expect_len("rms_norm y", y, rows * cols)?;
        let f = self.function("rms_norm")?;
        let (r, c) = (int("rows", rows)?, int("cols", cols)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(w).arg(y).arg(&r).arg(&c).arg(&eps);
        // SAFETY: sizes checked above; one block per row.
        unsafe { b.launch(rows_config(rows)) }?;
        Ok(())
    }

    /// Rotary embeddings in place over the leading `rotary_dim` dimensions of each head
    /// (all of it, or Phi-3's part). CPU twin: `CpuBackend::rotary`.
    pub fn rotary(
        &self,
        x: &mut CudaSlice<f32>,
        table: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        head_dim: usize,
        rotary_dim: usize,
    ) -> Result<()> {
        if rotary_dim == 0
            || !rotary_dim.is_multiple_of(2)
            || rotary_dim > head_dim
            || !cols.is_multiple_of(head_dim)
        {
            return Err(KernelError::Shape(format!(
                "rotary: {rotary_dim} rotating of {cols} features in heads of {head_dim}"
            )));
        }
        expect_len("rotary x", x, rows * cols)?;
        expect_len("rotary table", table, rows * rotary_dim)?;
        let f = self.function("rotary")?;
        let (r, c, d, rd) = (
            int("rows", rows)?,
            int("cols", cols)?,
            int("head_dim", head_dim)?,
            int("rotary_dim", rotary_dim)?,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(table).arg(&r).arg(&c).arg(&d).arg(&rd);
        // SAFETY: sizes checked above; one thread per rotated pair.
        unsafe { b.launch(elems(rows * (cols / head_dim) * rotary_dim / 2)) }?;
        Ok(())
    }

    /// `y = gate(g) · u`, the input of a gated MLP's down projection. CPU twins:
    /// `cpu_kernels::math::silu_mul_into`, `gelu_tanh_mul_into`.
    pub fn gate_mul(
        &self,
        gate: GateActivation,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        let entry = match gate {
            GateActivation::Silu => "silu_mul",
            GateActivation::GeluTanh => "gelu_tanh_mul",
        };
        self.launch_gate_mul(entry, g, u, y, n)
    }

    fn launch_gate_mul(
        &self,
        entry: &'static str,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        expect_len(&format!("{entry} gate"), g, n)?;
        expect_len(&format!("{entry} up"), u, n)?;
        expect_len(&format!("{entry} y"), y, n)?;
        let f = self.function(entry)?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(g).arg(u).arg(y).arg(&n64);
        // SAFETY: sizes checked above.
        unsafe { b.launch(elems(n)) }?;
        Ok(())
    }

    /// `x *= factor`. CPU twin: `CpuBackend::scale`.
    pub fn scale(&self, x: &mut CudaSlice<f32>, factor: f32, n: usize) -> Result<()> {
        self.in_place("scale", x, factor, n)
    }

    /// `x = tanh(x / cap) · cap`. CPU twin: the soft-capping of `CpuBackend::logits`.
    pub fn softcap(&self, x: &mut CudaSlice<f32>, cap: f32, n: usize) -> Result<()> {
        self.in_place("softcap", x, cap, n)
    }

    fn in_place(&self, entry: &'static str, x: &mut CudaSlice<f32>, value: f32, n: usize) -> Result<()> {
        expect_len(entry, x, n)?;
        let f = self.function(entry)?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&value).arg(&n64);
        // SAFETY: size checked above.
        unsafe { b.launch(elems(n)) }?;
        Ok(())
    }

    /// `x += y`. CPU twin: `CpuBackend::add_assign`.
    pub fn add_assign(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        expect_len("add x", x, n)?;
        expect_len("add y", y, n)?;
        let f = self.function("add_assign")?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(y).arg(&n64);
        // SAFETY: sizes checked above.
        unsafe { b.launch(elems(n)) }?;
        Ok(())
    }

    /// `x[r] += bias`. CPU twin: the bias step of `CpuBackend::linear_forward`.
    pub fn add_bias(
        &self,
        x: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        expect_len("bias x", x, rows * cols)?;
        expect_len("bias", bias, cols)?;
        let f = self.function("add_bias")?;
        let (r, c) = (int("rows", rows)?, int("cols", cols)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(bias).arg(&r).arg(&c);
        // SAFETY: sizes checked above.
        unsafe { b.launch(elems(rows * cols)) }?;
        Ok(())
    }

    /// Embedding rows of `ids` from a table holding ids `first_id..first_id + table_rows`,
    /// stored as f32, f16 or bf16; others get zero rows. CPU twin: `CpuBackend::embed_into`.
    #[allow(clippy::too_many_arguments)]
    pub fn embed<T: TableElement>(
        &self,
        table: &CudaSlice<T>,
        table_rows: usize,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        cols: usize,
        first_id: usize,
    ) -> Result<()> {
        expect_len("embed table", table, table_rows * cols)?;
        expect_len("embed ids", ids, n)?;
        expect_len("embed out", out, n * cols)?;
        let f = self.function(T::EMBED)?;
        let (nn, c, first, tr) = (
            int("n", n)?,
            int("cols", cols)?,
            int("first_id", first_id)?,
            int("rows", table_rows)?,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(table)
            .arg(ids)
            .arg(out)
            .arg(&nn)
            .arg(&c)
            .arg(&first)
            .arg(&tr);
        // SAFETY: sizes checked above; one block per output row.
        unsafe { b.launch(rows_config(n)) }?;
        Ok(())
    }

    /// `out[i] = x[rows[i]]`; every row index is checked against `x_rows` before anything
    /// reaches the device.
    pub fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        x_rows: usize,
        rows: &[u32],
        out: &mut CudaSlice<f32>,
        cols: usize,
    ) -> Result<()> {
        let n = rows.len();
        check_row_indices(rows, x_rows)?;
        expect_len("gather x", x, x_rows * cols)?;
        expect_len("gather out", out, n * cols)?;
        let rows = self.upload(rows)?;
        let f = self.function("gather_rows")?;
        let (nn, c) = (int("n", n)?, int("cols", cols)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&rows).arg(out).arg(&nn).arg(&c);
        // SAFETY: sizes checked; every row index is below x_rows (checked above).
        unsafe { b.launch(rows_config(n)) }?;
        Ok(())
    }

    /// f32 → f16 (round to nearest even).
    pub fn to_f16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f16>, n: usize) -> Result<()> {
        self.convert("to_f16", x, y, n)
    }

    /// f32 → bf16 (round to nearest even).
    pub fn to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<bf16>, n: usize) -> Result<()> {
        self.convert("to_bf16", x, y, n)
    }

    fn convert<T: DeviceRepr>(
        &self,
        kernel: &'static str,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<T>,
        n: usize,
    ) -> Result<()> {
        expect_len("convert x", x, n)?;
        expect_len("convert y", y, n)?;
        let f = self.function(kernel)?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(y).arg(&n64);
        // SAFETY: sizes checked above.
        unsafe { b.launch(elems(n)) }?;
        Ok(())
    }

    /// Per row of `[rows, vocab]` logits: `[max, Σ exp(l − max), target logit or 0]`.
    /// CPU twin: `CpuBackend::nll_parts`.
    pub fn nll_parts(
        &self,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<u32>,
        parts: &mut CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        first_id: usize,
    ) -> Result<()> {
        expect_len("nll logits", logits, rows * vocab)?;
        expect_len("nll targets", targets, rows)?;
        expect_len("nll parts", parts, rows * 3)?;
        let f = self.function("nll_parts")?;
        let (r, v, first) = (
            int("rows", rows)?,
            int("vocab", vocab)?,
            int("first_id", first_id)?,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(logits).arg(targets).arg(parts).arg(&r).arg(&v).arg(&first);
        // SAFETY: sizes checked above; one block per row.
        unsafe { b.launch(rows_config(rows)) }?;
        Ok(())
    }

    /// Causal grouped-query attention of `rows` queries over a key store of `key_rows` rows:
    /// query row r sits at position `pos[r]` of a sequence whose position 0 is key row
    /// `key_base[r]` (`pos` and `key_base` are checked on the host by the caller against
    /// `key_rows`). CPU twin: `CpuBackend::attention`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        key_base: &CudaSlice<u32>,
        pos: &CudaSlice<u32>,
        rows: usize,
        key_rows: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        softcap: Option<f32>,
        window: Option<usize>,
    ) -> Result<()> {
        if head_dim > 128 || !head_dim.is_multiple_of(4) || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(KernelError::Shape(format!(
                "attention: head_dim {head_dim} (at most 128, a multiple of 4), {heads} heads over {kv_heads} kv heads"
            )));
        }
        expect_len("attention q", q, rows * heads * head_dim)?;
        expect_len("attention k", k, key_rows * kv_heads * head_dim)?;
        expect_len("attention v", v, key_rows * kv_heads * head_dim)?;
        expect_len("attention out", out, rows * heads * head_dim)?;
        expect_len("attention key_base", key_base, rows)?;
        expect_len("attention pos", pos, rows)?;
        let f = self.function("attention")?;
        let launch = crate::launch::attention_launch(rows, heads, head_dim);
        let (r, h, kv, d) = (
            int("rows", rows)?,
            int("heads", heads)?,
            int("kv_heads", kv_heads)?,
            int("head_dim", head_dim)?,
        );
        let w = window.map_or(i32::MAX, |w| w.min(i32::MAX as usize) as i32);
        let bk = launch.key_tile as i32;
        let softcap = softcap.unwrap_or(0.0);
        let mut b = self.stream.launch_builder(&f);
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(out)
            .arg(key_base)
            .arg(pos)
            .arg(&r)
            .arg(&h)
            .arg(&kv)
            .arg(&d)
            .arg(&scale)
            .arg(&softcap)
            .arg(&w)
            .arg(&bk);
        let cfg = LaunchConfig {
            grid_dim: launch.grid,
            block_dim: (crate::launch::ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: launch.shared_bytes as u32,
        };
        // SAFETY: sizes checked above; shared memory sized as the kernel lays it out.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `y[m, out] = x[m, in] · Wt` for an AWQ weight, f16 activations, f32 output, the path
    /// chosen by `m`. CPU twin: `CpuAwq::matmul` on the same activations rounded to f16.
    pub fn w4a16(
        &self,
        x: &CudaSlice<f16>,
        w: &AwqDeviceWeight,
        y: &mut CudaSlice<f32>,
        m: usize,
    ) -> Result<()> {
        self.w4a16_with(W4a16Path::Auto, x, w, W4a16Out::F32(y), m)
    }

    /// The W4A16 product along a given path, into f32 or f16.
    pub fn w4a16_with(
        &self,
        path: W4a16Path,
        x: &CudaSlice<f16>,
        w: &AwqDeviceWeight,
        y: W4a16Out<'_>,
        m: usize,
    ) -> Result<()> {
        let (k, n, g) = (w.in_features, w.out_features, w.group_size);
        let strips = n.div_ceil(layout::STRIP);
        let steps = k / layout::STEP;
        if n % 8 != 0 || g == 0 || g % layout::STEP != 0 || k % g != 0 {
            return Err(KernelError::Shape(format!(
                "w4a16: [{n}, {k}] with group size {g}"
            )));
        }
        expect_len("w4a16 x", x, m * k)?;
        match &y {
            W4a16Out::F32(y) => expect_len("w4a16 y", y, m * n)?,
            W4a16Out::F16(y) => expect_len("w4a16 y", y, m * n)?,
        }
        expect_len("w4a16 qweight", &w.qweight, strips * steps * 128)?;
        expect_len("w4a16 zeros", &w.zeros, k / g * strips * 8)?;
        expect_len("w4a16 scales", &w.scales, k / g * strips * 64)?;
        if m == 0 {
            return Ok(());
        }
        let dequant = match path {
            W4a16Path::Auto => m >= DEQUANT_MIN_ROWS,
            W4a16Path::Fused | W4a16Path::Gemv => false,
            W4a16Path::Dequant => true,
        };
        let (mm, kk, nn, gg) = (int("m", m)?, int("k", k)?, int("n", n)?, int("group", g)?);
        let mut ws = self.workspace.lock().expect("workspace lock");
        if dequant {
            if ws.weight.len() < k * n {
                // SAFETY: fully written by the dequantization below before any read.
                ws.weight = unsafe { self.stream.alloc::<f16>(k * n) }?;
            }
            let f = self.function("w4a16_dequant")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&w.qweight)
                .arg(&w.zeros)
                .arg(&w.scales)
                .arg(&mut ws.weight)
                .arg(&kk)
                .arg(&nn)
                .arg(&gg);
            let cfg = LaunchConfig {
                grid_dim: (dequant_blocks(k, n)?, 1, 1),
                block_dim: ((32 * WARPS) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: sizes checked above; one warp per four k steps of a strip, the output [n, k].
            unsafe { b.launch(cfg) }?;
            return match y {
                W4a16Out::F16(y) => self.hgemm_nt(x, &ws.weight, y, m, k, n),
                W4a16Out::F32(y) => self.hgemm_nt_f32(x, &ws.weight, y, m, k, n),
            };
        }
        let kernel = match path {
            W4a16Path::Gemv => FusedKernel::Gemv,
            W4a16Path::Auto if m <= GEMV_MAX_ROWS => FusedKernel::Gemv,
            _ => FusedKernel::Mma,
        };
        let plan = fused_launch(
            kernel,
            m,
            k,
            n,
            matches!(y, W4a16Out::F32(_)),
            self.multiprocessors,
        )?;
        let (tiles, splits) = (plan.tiles(), plan.splits());
        if splits > 1 {
            if ws.partial.len() < splits * m * strips * layout::STRIP {
                // SAFETY: every element a reduction reads is written first by its split.
                ws.partial = unsafe { self.stream.alloc::<f32>(splits * m * strips * layout::STRIP) }?;
            }
            if ws.counters.len() < tiles {
                ws.counters = self.stream.alloc_zeros::<u32>(tiles)?;
            }
        }
        let f = self.function(plan.entry)?;
        let ks = int("k_split", plan.k_split)?;
        let Workspace {
            partial, counters, ..
        } = &mut *ws;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&w.qweight).arg(&w.zeros).arg(&w.scales);
        match y {
            W4a16Out::F32(y) => b.arg(y),
            W4a16Out::F16(y) => b.arg(y),
        };
        b.arg(partial)
            .arg(counters)
            .arg(&mm)
            .arg(&kk)
            .arg(&nn)
            .arg(&gg)
            .arg(&ks);
        let cfg = LaunchConfig {
            grid_dim: plan.grid,
            block_dim: ((32 * WARPS) as u32, 1, 1),
            shared_mem_bytes: plan.shared_bytes as u32,
        };
        // SAFETY: sizes checked above; the workspace holds splits × m × padded-n partial sums
        // and a zeroed counter per tile.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ` through cuBLAS, all in `T`: column-major views of the
    /// row-major buffers.
    #[allow(clippy::too_many_arguments)]
    fn gemm_nt<T>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
        m: usize,
        k: usize,
        n: usize,
        one: T,
        zero: T,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        expect_len("gemm x", x, m * k)?;
        expect_len("gemm w", w, n * k)?;
        expect_len("gemm y", y, m * n)?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int("n", n)?,
            n: int("m", m)?,
            k: int("k", k)?,
            alpha: one,
            lda: int("k", k)?,
            ldb: int("k", k)?,
            beta: zero,
            ldc: int("n", n)?,
        };
        // SAFETY: sizes checked above.
        unsafe { self.blas.gemm(cfg, w, x, y) }?;
        Ok(())
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ` in f32 through cuBLAS (TF32 off). CPU twin:
    /// `matmul_transposed`.
    pub fn sgemm_nt(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.gemm_nt(x, w, y, m, k, n, 1.0, 0.0)
    }

    /// The same product with f16 operands and output (f32 accumulation): the FP16 baseline.
    pub fn hgemm_nt(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.gemm_nt(x, w, y, m, k, n, f16::ONE, f16::ZERO)
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ` with f16 operands and an f32 output (f32 accumulation).
    pub fn hgemm_nt_f32(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.half_gemm_nt_f32(x, w, y, m, k, n)
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ` with f16 or bf16 operands and an f32 output (f32
    /// accumulation, cuBLAS `gemm_ex`). CPU twin: `CpuMatrix::matmul`.
    pub fn half_gemm_nt_f32<T: HalfElement>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        y: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        expect_len("half gemm x", x, m * k)?;
        expect_len("half gemm w", w, n * k)?;
        expect_len("half gemm y", y, m * n)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (mi, ki, ni) = (int("m", m)?, int("k", k)?, int("n", n)?);
        let (wp, _w_sync) = w.device_ptr(&self.stream);
        let (xp, _x_sync) = x.device_ptr(&self.stream);
        let (yp, _y_sync) = y.device_ptr_mut(&self.stream);
        // SAFETY: sizes checked above; column-major views of the row-major buffers, as in
        // sgemm_nt; the pointers stay valid while the guards live.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                T::CUDA_TYPE,
                ki,
                xp as *const _,
                T::CUDA_TYPE,
                ki,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                cudarc::cublas::sys::cudaDataType::CUDA_R_32F,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// Median milliseconds per call of `f`, over `reps` samples of `calls` back-to-back
    /// calls each (after warm-ups), timed with events on the stream. Several calls per
    /// sample keep the GPU busy, so that launch latency is not what is measured.
    pub fn time_ms(&self, reps: usize, calls: usize, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
        let calls = calls.max(1);
        for _ in 0..calls.min(4) {
            f()?;
        }
        self.synchronize()?;
        self.median_ms(reps, calls, || (0..calls).try_for_each(|_| f()))
    }

    /// Median over `reps` samples of the time `sample` queues, in milliseconds per call for
    /// `calls` calls per sample, timed with events on the stream.
    fn median_ms(&self, reps: usize, calls: usize, mut sample: impl FnMut() -> Result<()>) -> Result<f32> {
        // cudarc's default event flags disable timing.
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = self.stream.record_event(timed)?;
            sample()?;
            let end = self.stream.record_event(timed)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)? / calls as f32);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }

    /// Records the work `f` queues on the stream into a CUDA graph instead of running it.
    ///
    /// Nothing in `f` may allocate, compile or copy to the host (none of that is capturable):
    /// run `f` once before capturing it, so that kernels are compiled and scratch buffers
    /// sized. The capture ends, and the stream is usable again, whatever `f` returns.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let queued = f();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        queued?;
        graph?.ok_or(KernelError::EmptyCapture)
    }

    /// Like [`Gpu::time_ms`], with the `calls` calls captured once into a CUDA graph and the
    /// graph replayed: one submission for all of them, as a decoder step under CUDA graphs
    /// (vLLM, TensorRT-LLM) runs, so that the host's launch cost (4.2 µs per launch on the
    /// sandboxed H200) does not hide kernels that are shorter than it.
    pub fn time_graph_ms(&self, reps: usize, calls: usize, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
        let calls = calls.max(1);
        f()?;
        self.synchronize()?;
        let graph = self.capture(|| (0..calls).try_for_each(|_| f()))?;
        graph.upload()?;
        graph.launch()?;
        self.synchronize()?;
        self.median_ms(reps, calls, || Ok(graph.launch()?))
    }

    /// Device memory bandwidth in bytes/s, from a device-to-device copy of `bytes` (counting
    /// bytes read plus bytes written).
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        let n = bytes / 4;
        let src = self.filled(n, 1.0)?;
        let mut dst = self.zeros::<f32>(n)?;
        let ms = self.time_ms(10, 1, || Ok(self.stream.memcpy_dtod(&src, &mut dst)?))?;
        Ok(2.0 * (n * 4) as f64 / (ms as f64 / 1e3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_indices_past_the_source_are_refused_before_launch() {
        assert!(check_row_indices(&[0, 4, 2], 5).is_ok());
        let err = check_row_indices(&[0, 5, 2], 5).unwrap_err().to_string();
        assert!(
            err.contains("row index 5 at position 1") && err.contains("5 rows"),
            "{err}"
        );
        assert!(check_row_indices(&[u32::MAX], 5).is_err());
    }
}
