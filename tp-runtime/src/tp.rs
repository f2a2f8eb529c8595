//! A model split over in-process tensor-parallel ranks, one thread each, joined by a
//! communicator. Every rank ends a forward pass with the same hidden states and scores;
//! rank 0's are returned.

use std::path::Path;
use std::sync::Arc;

use checkpoint::{Checkpoint, ModelConfig};

#[cfg(feature = "cuda")]
use crate::backend::CudaBackend;
use crate::backend::{Backend, CpuBackend, Prediction, SeqLayout};
use crate::comm::LocalCommunicator;
#[cfg(feature = "cuda")]
use crate::comm::{NcclCommunicator, nccl_available, new_unique_id};
use crate::model::{Comm, Model, Scorer};
use crate::shard::ShardPlan;
use crate::{Error, Result};

/// The ranks of one tensor-parallel group.
pub struct TensorParallel<B: Backend> {
    plan: ShardPlan,
    config: ModelConfig,
    ranks: Vec<Model<B>>,
}

impl TensorParallel<CpuBackend> {
    /// Loads `dir` split over `tp` CPU ranks. The plan is checked from the configuration
    /// before any weight is read; each rank then reads only its share.
    pub fn load_cpu(dir: &Path, tp: usize) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let plan = ShardPlan::new(&config, tp)?;
        let checkpoint = Checkpoint::open(dir)?;
        let ranks = plan
            .ranks()
            .into_iter()
            .zip(LocalCommunicator::group(tp))
            .map(|(shard, comm)| {
                let comm: Comm<CpuBackend> = Arc::new(comm);
                Model::load_rank(config.clone(), &checkpoint, CpuBackend::new(), shard, Some(comm))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TensorParallel { plan, config, ranks })
    }
}

#[cfg(feature = "cuda")]
impl TensorParallel<CudaBackend> {
    /// Loads `dir` split over GPUs `0..tp`, one rank (and thread) per GPU, joined by NCCL.
    /// The plan is checked before any weight is read; each rank uploads only its share.
    pub fn load_cuda(dir: &Path, tp: usize) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let plan = ShardPlan::new(&config, tp)?;
        let gpus = cuda_kernels::cuda_available()?;
        if tp > gpus {
            return Err(Error::Device(format!(
                "tp = {tp} needs {tp} GPUs; this machine has {gpus}"
            )));
        }
        if tp > 1 && !nccl_available() {
            return Err(Error::Device(
                "tp > 1 on GPUs needs NCCL, and libnccl could not be loaded".into(),
            ));
        }
        let id = if tp > 1 { Some(new_unique_id()?) } else { None };
        let checkpoint = Checkpoint::open(dir)?;
        // NCCL's initialisation is collective: every rank joins at once, each on its own
        // thread with its own GPU's context bound.
        let ranks: Vec<Result<Model<CudaBackend>>> = std::thread::scope(|s| {
            let handles: Vec<_> = plan
                .ranks()
                .into_iter()
                .map(|shard| {
                    let (config, checkpoint, id) = (&config, &checkpoint, &id);
                    s.spawn(move || {
                        let backend = CudaBackend::new(shard.rank)?;
                        backend
                            .gpu()
                            .context()
                            .bind_to_thread()
                            .map_err(|e| Error::Device(format!("{e:?}")))?;
                        let comm: Option<Comm<CudaBackend>> = match id {
                            Some(id) => {
                                let stream = backend.gpu().stream().clone();
                                Some(Arc::new(NcclCommunicator::new(stream, shard.rank, tp, id)?))
                            }
                            None => None,
                        };
                        Model::load_rank(config.clone(), checkpoint, backend, shard, comm)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Invalid("a rank panicked while loading".into())))
                })
                .collect()
        });
        let ranks = ranks.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(TensorParallel { plan, config, ranks })
    }
}

impl<B: Backend> TensorParallel<B> {
    /// The shard plan.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The ranks.
    pub fn ranks(&self) -> &[Model<B>] {
        &self.ranks
    }

    /// Weight bytes held by each rank.
    pub fn rank_weight_bytes(&self) -> Vec<usize> {
        self.ranks.iter().map(Model::weight_bytes).collect()
    }

    /// Runs `f` on every rank, each on its own thread; returns rank 0's result, or the first
    /// error.
    fn on_every_rank<T: Send>(&self, f: impl Fn(&Model<B>) -> Result<T> + Sync) -> Result<T> {
        let results: Vec<Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = self.ranks.iter().map(|m| s.spawn(|| f(m))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Invalid("a tensor-parallel rank panicked".into())))
                })
                .collect()
        });
        let mut first = None;
        for r in results {
            match (r, &first) {
                (Err(e), _) => return Err(e),
                (Ok(v), None) => first = Some(v),
                (Ok(_), Some(_)) => {}
            }
        }
        first.ok_or_else(|| Error::Invalid("no ranks".into()))
    }

    /// Full logits of the given rows after a forward pass (gathered from the ranks).
    pub fn logits(&self, ids: &[u32], layout: &SeqLayout, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.on_every_rank(|m| {
            let hidden = m.forward(ids, layout)?;
            m.logits(&hidden, rows)
        })
    }
}

impl<B: Backend> Scorer for TensorParallel<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn score(&self, ids: &[u32], layout: &SeqLayout, predictions: &[Prediction]) -> Result<Vec<f32>> {
        self.on_every_rank(|m| m.score(ids, layout, predictions))
    }
}
