//! One CUDA device: context, stream, the compiled modules (cached per device, compiled with
//! NVRTC at first use for the device's own architecture), cuBLAS, and a safe wrapper per
//! kernel that checks buffer sizes before launching.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use crate::compile::{arch_names, nvrtc_available, ptx};
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

/// An AWQ "gemm" weight on the device, exactly as in the checkpoint.
pub struct AwqDeviceWeight {
    /// `[in, out/8]` packed words.
    pub qweight: CudaSlice<u32>,
    /// `[in/g, out/8]` packed words.
    pub qzeros: CudaSlice<u32>,
    /// `[in/g, out]` f16 bits.
    pub scales: CudaSlice<u16>,
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
}

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels.
const ELEM_THREADS: u32 = 256;
/// Word columns per GEMV block (must match GEMV_THREADS in w4a16.cu).
const GEMV_THREADS: u32 = 128;
/// Rows at or below which W4A16 uses the GEMV kernel.
pub const GEMV_MAX_ROWS: usize = 16;

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
        return Err(KernelError::Shape(format!("{what}: buffer of {} elements, {want} needed", buf.len())));
    }
    Ok(())
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::Shape(format!("{what} = {v} exceeds the kernels' 32-bit indices")))
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
        let multiprocessors = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(Arc::clone(&stream))?;
        let gpu = Arc::new(Gpu {
            ordinal,
            name: ctx.name()?,
            arch: arch_names(major, minor).0,
            multiprocessors,
            ctx,
            stream,
            blas,
            functions: Mutex::new(HashMap::new()),
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
            functions.insert(e, module.load_function(e)?);
        }
        Ok(functions[entry].clone())
    }

    /// Copies host values to the device.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
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
    pub fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, y: &mut CudaSlice<f32>, rows: usize, cols: usize, eps: f32) -> Result<()> {
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

    /// Rotary embeddings in place. CPU twin: `CpuBackend::rotary`.
    pub fn rotary(&self, x: &mut CudaSlice<f32>, table: &CudaSlice<f32>, rows: usize, cols: usize, head_dim: usize) -> Result<()> {
        if head_dim == 0 || head_dim % 2 != 0 || cols % head_dim != 0 {
            return Err(KernelError::Shape(format!("rotary: {cols} features in heads of {head_dim}")));
        }
        expect_len("rotary x", x, rows * cols)?;
        expect_len("rotary table", table, rows * head_dim)?;
        let f = self.function("rotary")?;
        let (r, c, d) = (int("rows", rows)?, int("cols", cols)?, int("head_dim", head_dim)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(table).arg(&r).arg(&c).arg(&d);
        // SAFETY: sizes checked above; one thread per rotated pair.
        unsafe { b.launch(elems(rows * cols / 2)) }?;
        Ok(())
    }

    /// `y = silu(g) · u`. CPU twin: `CpuBackend::silu_mul`.
    pub fn silu_mul(&self, g: &CudaSlice<f32>, u: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        expect_len("silu_mul gate", g, n)?;
        expect_len("silu_mul up", u, n)?;
        expect_len("silu_mul y", y, n)?;
        let f = self.function("silu_mul")?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(g).arg(u).arg(y).arg(&n64);
        // SAFETY: sizes checked above.
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
    pub fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
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

    /// Embedding rows of `ids` from a table holding ids `first_id..first_id + table_rows`;
    /// others get zero rows. CPU twin: `CpuBackend::embed`.
    pub fn embed(
        &self,
        table: &CudaSlice<f32>,
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
        let f = self.function("embed")?;
        let (nn, c, first, tr) = (int("n", n)?, int("cols", cols)?, int("first_id", first_id)?, int("rows", table_rows)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(table).arg(ids).arg(out).arg(&nn).arg(&c).arg(&first).arg(&tr);
        // SAFETY: sizes checked above; one block per output row.
        unsafe { b.launch(rows_config(n)) }?;
        Ok(())
    }

    /// `out[i] = x[rows[i]]`.
    pub fn gather_rows(&self, x: &CudaSlice<f32>, x_rows: usize, rows: &CudaSlice<u32>, out: &mut CudaSlice<f32>, n: usize, cols: usize) -> Result<()> {
        expect_len("gather x", x, x_rows * cols)?;
        expect_len("gather rows", rows, n)?;
        expect_len("gather out", out, n * cols)?;
        let f = self.function("gather_rows")?;
        let (nn, c) = (int("n", n)?, int("cols", cols)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(rows).arg(out).arg(&nn).arg(&c);
        // SAFETY: sizes checked; row indices are checked by the caller against x_rows.
        unsafe { b.launch(rows_config(n)) }?;
        Ok(())
    }

    /// f32 → f16 bits.
    pub fn to_f16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>, n: usize) -> Result<()> {
        expect_len("to_f16 x", x, n)?;
        expect_len("to_f16 y", y, n)?;
        let f = self.function("to_f16")?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(y).arg(&n64);
        // SAFETY: sizes checked above.
        unsafe { b.launch(elems(n)) }?;
        Ok(())
    }

    /// Per row of `[rows, vocab]` logits: `[max, Σ exp(l − max), target logit or 0]`.
    /// CPU twin: `CpuBackend::nll_parts`.
    pub fn nll_parts(&self, logits: &CudaSlice<f32>, targets: &CudaSlice<u32>, parts: &mut CudaSlice<f32>, rows: usize, vocab: usize, first_id: usize) -> Result<()> {
        expect_len("nll logits", logits, rows * vocab)?;
        expect_len("nll targets", targets, rows)?;
        expect_len("nll parts", parts, rows * 3)?;
        let f = self.function("nll_parts")?;
        let (r, v, first) = (int("rows", rows)?, int("vocab", vocab)?, int("first_id", first_id)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(logits).arg(targets).arg(parts).arg(&r).arg(&v).arg(&first);
        // SAFETY: sizes checked above; one block per row.
        unsafe { b.launch(rows_config(rows)) }?;
        Ok(())
    }

    /// Causal grouped-query attention within sequences (`seq_start[r]` is the first row of
    /// row r's sequence). CPU twin: `CpuBackend::attention`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        seq_start: &CudaSlice<u32>,
        rows: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Result<()> {
        if head_dim > 128 || head_dim % 4 != 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(KernelError::Shape(format!(
                "attention: head_dim {head_dim} (at most 128, a multiple of 4), {heads} heads over {kv_heads} kv heads"
            )));
        }
        expect_len("attention q", q, rows * heads * head_dim)?;
        expect_len("attention k", k, rows * kv_heads * head_dim)?;
        expect_len("attention v", v, rows * kv_heads * head_dim)?;
        expect_len("attention out", out, rows * heads * head_dim)?;
        expect_len("attention seq_start", seq_start, rows)?;
        let f = self.function("attention")?;
        const BQ: usize = 32;
        let bk = if head_dim <= 64 { 32 } else { 16 };
        let smem = (BQ * head_dim + bk * (head_dim + 1) + bk * head_dim + BQ * (bk + 1) + 3 * BQ) * 4;
        let (r, h, kv, d) = (int("rows", rows)?, int("heads", heads)?, int("kv_heads", kv_heads)?, int("head_dim", head_dim)?);
        let w = window.map_or(i32::MAX, |w| w.min(i32::MAX as usize) as i32);
        let bk = bk as i32;
        let mut b = self.stream.launch_builder(&f);
        b.arg(q).arg(k).arg(v).arg(out).arg(seq_start).arg(&r).arg(&h).arg(&kv).arg(&d).arg(&scale).arg(&w).arg(&bk);
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(BQ as u32).max(1), heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: sizes checked above; shared memory sized as the kernel lays it out.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `y[m, out] = x[m, in] · Wt` for an AWQ "gemm" weight: GEMV kernels up to
    /// [`GEMV_MAX_ROWS`] rows, tensor cores above. CPU twin: `CpuAwq::matmul`.
    pub fn w4a16(&self, x: &CudaSlice<f32>, w: &AwqDeviceWeight, y: &mut CudaSlice<f32>, m: usize) -> Result<()> {
        let (k, n, g) = (w.in_features, w.out_features, w.group_size);
        if n % 8 != 0 || g == 0 || k % g != 0 {
            return Err(KernelError::Shape(format!("w4a16: [{n}, {k}] with group size {g}")));
        }
        expect_len("w4a16 x", x, m * k)?;
        expect_len("w4a16 y", y, m * n)?;
        expect_len("w4a16 qweight", &w.qweight, k * n / 8)?;
        expect_len("w4a16 qzeros", &w.qzeros, k / g * n / 8)?;
        expect_len("w4a16 scales", &w.scales, k / g * n)?;
        let (mm, kk, nn, gg) = (int("m", m)?, int("k", k)?, int("n", n)?, int("group", g)?);
        if m <= GEMV_MAX_ROWS {
            let words = n / 8;
            let blocks_x = (words as u32).div_ceil(GEMV_THREADS);
            // Enough K slices to put two blocks on every multiprocessor.
            let target = (2 * self.multiprocessors).div_ceil(blocks_x as usize).max(1);
            let k_slice = k.div_ceil(target).next_multiple_of(16).max(16);
            let slices = k.div_ceil(k_slice);
            let mut partial = self.zeros::<f32>(slices * m * n)?;
            let ks = int("k_slice", k_slice)?;
            for m0 in (0..m).step_by(8) {
                let rows = (m - m0).min(8);
                let (entry, mt) = match rows {
                    1 => ("w4a16_gemv_m1", 1),
                    2 => ("w4a16_gemv_m2", 2),
                    3 | 4 => ("w4a16_gemv_m4", 4),
                    _ => ("w4a16_gemv_m8", 8),
                };
                let f = self.function(entry)?;
                let m0i = m0 as i32;
                let mut b = self.stream.launch_builder(&f);
                b.arg(x).arg(&w.qweight).arg(&w.qzeros).arg(&w.scales).arg(&mut partial);
                b.arg(&mm).arg(&kk).arg(&nn).arg(&gg).arg(&ks).arg(&m0i);
                let cfg = LaunchConfig {
                    grid_dim: (blocks_x, slices as u32, 1),
                    block_dim: (GEMV_THREADS, 1, 1),
                    shared_mem_bytes: (mt * k_slice * 4) as u32,
                };
                // SAFETY: sizes checked above; partial holds slices × m × n floats.
                unsafe { b.launch(cfg) }?;
            }
            let f = self.function("w4a16_reduce")?;
            let (sl, mn) = (slices as i32, (m * n) as i64);
            let mut b = self.stream.launch_builder(&f);
            b.arg(&partial).arg(y).arg(&sl).arg(&mn);
            // SAFETY: partial holds slices × m × n floats, y m × n.
            unsafe { b.launch(elems(m * n)) }?;
        } else {
            let f = self.function("w4a16_gemm_tc")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(x).arg(&w.qweight).arg(&w.qzeros).arg(&w.scales).arg(y).arg(&mm).arg(&kk).arg(&nn).arg(&gg);
            let cfg = LaunchConfig {
                grid_dim: ((n as u32).div_ceil(128), (m as u32).div_ceil(128), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: sizes checked above; edges are guarded in the kernel.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ` in f32 through cuBLAS (TF32 off). CPU twin:
    /// `matmul_transposed`.
    pub fn sgemm_nt(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, y: &mut CudaSlice<f32>, m: usize, k: usize, n: usize) -> Result<()> {
        expect_len("sgemm x", x, m * k)?;
        expect_len("sgemm w", w, n * k)?;
        expect_len("sgemm y", y, m * n)?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int("n", n)?,
            n: int("m", m)?,
            k: int("k", k)?,
            alpha: 1.0f32,
            lda: int("k", k)?,
            ldb: int("k", k)?,
            beta: 0.0f32,
            ldc: int("n", n)?,
        };
        // SAFETY: sizes checked above; column-major views of the row-major buffers.
        unsafe { self.blas.gemm(cfg, w, x, y) }?;
        Ok(())
    }

    /// The same product with f16 operands and output (f32 accumulation): the FP16 baseline.
    pub fn hgemm_nt(&self, x: &CudaSlice<half::f16>, w: &CudaSlice<half::f16>, y: &mut CudaSlice<half::f16>, m: usize, k: usize, n: usize) -> Result<()> {
        expect_len("hgemm x", x, m * k)?;
        expect_len("hgemm w", w, n * k)?;
        expect_len("hgemm y", y, m * n)?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int("n", n)?,
            n: int("m", m)?,
            k: int("k", k)?,
            alpha: half::f16::ONE,
            lda: int("k", k)?,
            ldb: int("k", k)?,
            beta: half::f16::ZERO,
            ldc: int("n", n)?,
        };
        // SAFETY: sizes checked above.
        unsafe { self.blas.gemm(cfg, w, x, y) }?;
        Ok(())
    }

    /// Median milliseconds of `f` over `reps` timed runs (after two warm-ups), timed with
    /// events on the stream.
    pub fn time_ms(&self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
        for _ in 0..2 {
            f()?;
        }
        self.synchronize()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = self.stream.record_event(None)?;
            f()?;
            let end = self.stream.record_event(None)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)?);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }

    /// Device memory bandwidth in bytes/s, from a device-to-device copy of `bytes` (counting
    /// bytes read plus bytes written).
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        let n = bytes / 4;
        let src = self.filled(n, 1.0)?;
        let mut dst = self.zeros::<f32>(n)?;
        let ms = self.time_ms(10, || Ok(self.stream.memcpy_dtod(&src, &mut dst)?))?;
        Ok(2.0 * (n * 4) as f64 / (ms as f64 / 1e3))
    }
}
