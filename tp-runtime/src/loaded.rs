//! Opening a checkpoint for use: on the device asked for, as one model or a group of ranks
//! (a placement over several ranks, or a pre-sharded folder), behind one object that scores,
//! decodes and describes itself. Commands (evaluation, generation, benchmarks) load through
//! here, so that the choice is made once.

use std::path::Path;

use checkpoint::ModelConfig;
use checkpoint::presharded::Mapping;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::compute::{Compute, ComputeRequest};
use crate::decode::Decoder;
use crate::model::{Model, Scorer};
use crate::placement::{Placement, PlacementRequest};
use crate::{CpuBackend, Error, RankGroup, Result};

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU backend (rayon threads); ranks are threads of this process.
    #[default]
    Cpu,
    /// The CUDA backend: one GPU per rank, each stage's ranks joined by NCCL.
    Cuda,
}

/// A loaded model, one rank or a group: it scores, decodes, and says how it is laid out.
pub trait LoadedModel: Scorer + Decoder + Send + Sync {
    /// The backend, for reports ("cpu", "cuda:0 × 4 ranks").
    fn backend_name(&self) -> String;
    /// How the model is split.
    fn placement(&self) -> Placement;
    /// Bytes of weights each rank holds in its backend's memory.
    fn rank_weight_bytes(&self) -> Vec<usize>;
    /// Bytes each rank read from the checkpoint, as stored.
    fn rank_loaded_bytes(&self) -> Vec<u64>;
    /// Busy seconds of each pipeline stage so far (groups only).
    fn stage_seconds(&self) -> Option<Vec<f64>>;
    /// Bytes of every rank's KV cache together.
    fn cache_bytes(&self) -> usize;
}

impl<B: Backend> LoadedModel for Model<B> {
    fn backend_name(&self) -> String {
        self.backend().name()
    }
    fn placement(&self) -> Placement {
        Placement::single(Scorer::config(self))
    }
    fn rank_weight_bytes(&self) -> Vec<usize> {
        vec![self.weight_bytes()]
    }
    fn rank_loaded_bytes(&self) -> Vec<u64> {
        vec![self.loaded_bytes()]
    }
    fn stage_seconds(&self) -> Option<Vec<f64>> {
        None
    }
    fn cache_bytes(&self) -> usize {
        Model::cache_bytes(self)
    }
}

impl<B: Backend> LoadedModel for RankGroup<B> {
    fn backend_name(&self) -> String {
        format!(
            "{} × {} ranks",
            self.ranks()[0].backend().name(),
            self.ranks().len()
        )
    }
    fn placement(&self) -> Placement {
        RankGroup::placement(self).clone()
    }
    fn rank_weight_bytes(&self) -> Vec<usize> {
        RankGroup::rank_weight_bytes(self)
    }
    fn rank_loaded_bytes(&self) -> Vec<u64> {
        RankGroup::rank_loaded_bytes(self)
    }
    fn stage_seconds(&self) -> Option<Vec<f64>> {
        Some(RankGroup::stage_seconds(self))
    }
    fn cache_bytes(&self) -> usize {
        self.ranks().iter().map(Model::cache_bytes).sum()
    }
}

/// The placement a load of `dir` would use: the request resolved against the configuration
/// and, for a pre-sharded folder, its mapping. Reads no weights.
pub fn resolve(dir: &Path, request: &PlacementRequest) -> Result<Placement> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let mapping = Mapping::read(dir)?;
    request.resolve(&config, mapping.as_ref())
}

/// Fails at once, before minutes of tokenizing and loading, where the GPUs a placement of
/// `world_size` ranks needs are not there or our kernels cannot run on them.
pub fn check_device(device: Device, world_size: usize) -> Result<()> {
    if device != Device::Cuda {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        use cuda_kernels::devices::{MIN_CAPABILITY, probe};
        let gpus = probe().map_err(|e| Error::Device(format!("--backend cuda: {e}")))?;
        if world_size > gpus.len() {
            return Err(Error::Device(format!(
                "--backend cuda: the placement has {world_size} ranks, one GPU each; this machine has {}",
                gpus.len()
            )));
        }
        if let Some(bad) = gpus[..world_size].iter().find(|d| !d.supported()) {
            return Err(Error::Device(format!(
                "--backend cuda: GPU {} ({}) has compute capability {}.{}; the kernels need {}.{} or newer",
                bad.ordinal, bad.name, bad.capability.0, bad.capability.1, MIN_CAPABILITY.0, MIN_CAPABILITY.1
            )));
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = world_size;
        Err(Error::Device(
            "--backend cuda: this build has no CUDA support (build with the `cuda` feature)".into(),
        ))
    }
}

/// The CPU arithmetic for the model in `dir`: `auto` takes 16 bits where the checkpoint is
/// AWQ or stored in 16 bits (its products are 16-bit in nature) and the CPU has a native
/// bf16 product.
pub fn resolve_compute(dir: &Path, compute: ComputeRequest) -> Result<Compute> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let sixteen_bit = config.quantization.is_some()
        || matches!(config.torch_dtype.as_deref(), Some("bfloat16" | "float16"));
    Ok(compute.resolve_here(sixteen_bit)?)
}

/// Loads `dir` on `device` as `request` places it: one model where the placement is a
/// single rank of an unsharded folder, else a [`RankGroup`]. On the CPU, matrix products
/// compute as `compute` resolves to ([`resolve_compute`]); GPUs ignore it.
pub fn load(
    dir: &Path,
    device: Device,
    compute: ComputeRequest,
    request: &PlacementRequest,
) -> Result<Box<dyn LoadedModel>> {
    let placement = resolve(dir, request)?;
    check_device(device, placement.world_size())?;
    let split = placement.world_size() > 1 || Mapping::read(dir)?.is_some();
    let cpu = || resolve_compute(dir, compute).map(CpuBackend::with_compute);
    Ok(match (device, split) {
        (Device::Cpu, false) => Box::new(Model::load(dir, cpu()?)?),
        (Device::Cpu, true) => Box::new(RankGroup::load_cpu_on(dir, request, cpu()?)?),
        #[cfg(feature = "cuda")]
        (Device::Cuda, false) => Box::new(Model::load(dir, crate::CudaBackend::new(0)?)?),
        #[cfg(feature = "cuda")]
        (Device::Cuda, true) => Box::new(RankGroup::load_cuda(dir, request)?),
        #[cfg(not(feature = "cuda"))]
        (Device::Cuda, _) => unreachable!("check_device refuses cuda without the feature"),
    })
}
