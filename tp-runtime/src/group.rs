//! A model split over ranks: tensor-parallel ranks inside pipeline stages, one thread each.
//!
//! Stage `s`'s ranks run its layers on one batch after another; each hands the residual
//! stream to the rank of the same tensor-parallel index in stage `s + 1` through a bounded
//! channel (activations cross through host memory), so stage `s + 1` works on batch `i`
//! while stage `s` works on batch `i + 1`. Inside a stage the ranks meet in collectives.
//!
//! A rank that fails (an error, a panic, a failed collective, a file it cannot read) raises
//! the group's [`Abort`] flag: every other rank stops within [`Abort::POLL`] at its next
//! collective or hand-over, and the group's call returns the failing rank and its cause.
//! The group is then finished: later calls return the same error.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use checkpoint::presharded::{Mapping, rank_file};
use checkpoint::{Checkpoint, ModelConfig};

#[cfg(feature = "cuda")]
use crate::backend::CudaBackend;
use crate::backend::{Backend, CpuBackend, Prediction, SeqLayout};
use crate::comm::{Abort, Communicator, LocalCommunicator};
use crate::decode::{Decoder, last_rows, per_sequence};
use crate::load::WeightSource;
use crate::model::{Batch, Comm, Model, Scorer, Workspace};
use crate::placement::{Placement, PlacementRequest};
use crate::{Error, Result};

/// Batches in flight between two stages.
const IN_FLIGHT: usize = 2;

/// A failure to inject into one rank, to test that a failing rank ends its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    /// The batch (0-based, within one call) before which it strikes.
    pub batch: usize,
    pub kind: FaultKind,
}

/// What an injected fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The rank returns an error.
    Error,
    /// The rank panics.
    Panic,
    /// The rank's next collective fails (CPU ranks under tensor parallelism).
    Collective,
}

/// The ranks of a placement, each with its share of the model.
pub struct RankGroup<B: Backend> {
    config: ModelConfig,
    placement: Placement,
    ranks: Vec<Model<B>>,
    abort: Arc<Abort>,
    /// The in-process communicators, for injected collective failures.
    local_comms: Vec<Option<Arc<LocalCommunicator>>>,
    faults: Vec<Fault>,
    /// Seconds each rank spent computing (waits excluded), over every call.
    busy_seconds: Mutex<Vec<f64>>,
    /// The weight files each rank opened.
    rank_files: Vec<Vec<PathBuf>>,
}

/// Where each rank reads its weights: the model's checkpoint (opened once, shared), or its
/// own file of a pre-sharded checkpoint.
enum Sources {
    Shared(Checkpoint),
    PerRank(Vec<Checkpoint>),
}

impl Sources {
    fn open(dir: &Path, mapping: Option<&Mapping>, world_size: usize) -> Result<Self> {
        Ok(match mapping {
            None => Sources::Shared(Checkpoint::open(dir)?),
            Some(_) => Sources::PerRank(
                (0..world_size)
                    .map(|r| Checkpoint::open_file(dir, &rank_file(r)))
                    .collect::<checkpoint::Result<_>>()?,
            ),
        })
    }

    fn of(&self, rank: usize) -> WeightSource<'_> {
        match self {
            Sources::Shared(c) => WeightSource::Full(c),
            Sources::PerRank(files) => WeightSource::Rank(&files[rank]),
        }
    }

    fn files(&self, world_size: usize) -> Vec<Vec<PathBuf>> {
        (0..world_size)
            .map(|r| self.of(r).checkpoint().files().map(Path::to_path_buf).collect())
            .collect()
    }
}

/// The configuration, the placement `request` resolves to, and where the weights are.
fn prepare(dir: &Path, request: &PlacementRequest) -> Result<(ModelConfig, Placement, Sources)> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let mapping = Mapping::read(dir)?;
    // Checked before any weight file is opened.
    let placement = request.resolve(&config, mapping.as_ref())?;
    let sources = Sources::open(dir, mapping.as_ref(), placement.world_size())?;
    Ok((config, placement, sources))
}

/// Loads every rank on its own thread; the first failure names its rank.
fn load_ranks<B: Backend>(
    placement: &Placement,
    abort: &Abort,
    load: impl Fn(usize) -> Result<Model<B>> + Sync,
) -> Result<Vec<Model<B>>> {
    let results: Vec<Result<Model<B>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..placement.world_size())
            .map(|r| {
                let load = &load;
                s.spawn(move || load(r))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("panicked while loading".into())))
            })
            .collect()
    });
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| {
            r.map_err(|e| {
                abort.raise(rank, e.to_string());
                Error::RankFailed {
                    failed: rank,
                    cause: e.to_string(),
                }
            })
        })
        .collect()
}

impl RankGroup<CpuBackend> {
    /// Loads `dir` placed as `request` asks (or as its pre-sharded mapping says) on
    /// in-process CPU ranks. The placement is checked from the configuration before any
    /// weight is read; each rank then reads only its share.
    pub fn load_cpu(dir: &Path, request: &PlacementRequest) -> Result<Self> {
        Self::load_cpu_on(dir, request, CpuBackend::new())
    }

    /// [`load_cpu`](Self::load_cpu) with every rank on (a copy of) `backend`.
    pub fn load_cpu_on(dir: &Path, request: &PlacementRequest, backend: CpuBackend) -> Result<Self> {
        let (config, placement, sources) = prepare(dir, request)?;
        let abort = Arc::new(Abort::new());
        let tp = placement.tp();
        let mut local_comms: Vec<Option<Arc<LocalCommunicator>>> = vec![None; placement.world_size()];
        if tp > 1 {
            for stage in 0..placement.pp() {
                for (t, comm) in LocalCommunicator::group_in(tp, stage * tp, Arc::clone(&abort))
                    .into_iter()
                    .enumerate()
                {
                    local_comms[stage * tp + t] = Some(Arc::new(comm));
                }
            }
        }
        let ranks = load_ranks(&placement, &abort, |r| {
            let comm: Option<Comm<CpuBackend>> =
                local_comms[r].clone().map(|c| c as Arc<dyn Communicator<[f32]>>);
            Model::load_rank(config.clone(), sources.of(r), backend, placement.rank(r), comm)
        })?;
        let files = sources.files(placement.world_size());
        Ok(Self::assemble(
            config,
            placement,
            ranks,
            abort,
            local_comms,
            files,
        ))
    }
}

#[cfg(feature = "cuda")]
impl RankGroup<CudaBackend> {
    /// Loads `dir` over GPUs: rank `r` on GPU `r mod n`, the ranks of a stage joined by NCCL
    /// (with one GPU, every rank shares GPU 0). The placement is checked before any weight is
    /// read; each rank uploads only its share. A rank that fails inside an NCCL collective is
    /// not yet recovered from (NCCL's abort is not wired in).
    pub fn load_cuda(dir: &Path, request: &PlacementRequest) -> Result<Self> {
        use crate::comm::{NcclCommunicator, nccl_available, new_unique_id};
        let (config, placement, sources) = prepare(dir, request)?;
        let gpus = cuda_kernels::cuda_available()?;
        let tp = placement.tp();
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
        let ids = (0..placement.pp())
            .map(|_| (tp > 1).then(new_unique_id).transpose())
            .collect::<Result<Vec<_>>>()?;
        let abort = Arc::new(Abort::new());
        // NCCL's initialisation is collective: every rank of a stage joins at once, each on
        // its own thread with its own GPU's context bound.
        let ranks = load_ranks(&placement, &abort, |r| {
            let rank = placement.rank(r);
            let backend = CudaBackend::new(r % gpus)?;
            backend
                .gpu()
                .context()
                .bind_to_thread()
                .map_err(cuda_kernels::KernelError::from)?;
            let comm: Option<Comm<CudaBackend>> = match &ids[rank.stage] {
                Some(id) => {
                    let stream = backend.gpu().stream().clone();
                    Some(Arc::new(NcclCommunicator::new(stream, rank.shard.rank, tp, id)?))
                }
                None => None,
            };
            Model::load_rank(config.clone(), sources.of(r), backend, rank, comm)
        })?;
        let none = vec![None; placement.world_size()];
        let files = sources.files(placement.world_size());
        Ok(Self::assemble(config, placement, ranks, abort, none, files))
    }
}

impl<B: Backend> RankGroup<B> {
    fn assemble(
        config: ModelConfig,
        placement: Placement,
        ranks: Vec<Model<B>>,
        abort: Arc<Abort>,
        local_comms: Vec<Option<Arc<LocalCommunicator>>>,
        rank_files: Vec<Vec<PathBuf>>,
    ) -> Self {
        let busy_seconds = Mutex::new(vec![0.0; ranks.len()]);
        RankGroup {
            config,
            placement,
            ranks,
            abort,
            local_comms,
            faults: Vec::new(),
            busy_seconds,
            rank_files,
        }
    }

    /// The weight files each rank opened (its own alone, for a pre-sharded checkpoint).
    pub fn rank_files(&self) -> &[Vec<PathBuf>] {
        &self.rank_files
    }

    /// The placement.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The ranks, in rank order.
    pub fn ranks(&self) -> &[Model<B>] {
        &self.ranks
    }

    /// Weight bytes each rank holds in its backend's memory.
    pub fn rank_weight_bytes(&self) -> Vec<usize> {
        self.ranks.iter().map(Model::weight_bytes).collect()
    }

    /// Bytes each rank read from the checkpoint, as stored.
    pub fn rank_loaded_bytes(&self) -> Vec<u64> {
        self.ranks.iter().map(Model::loaded_bytes).collect()
    }

    /// Seconds each stage spent computing so far (the busiest of its ranks).
    pub fn stage_seconds(&self) -> Vec<f64> {
        let busy = self.busy_seconds.lock().unwrap_or_else(|e| e.into_inner());
        let tp = self.placement.tp();
        busy.chunks(tp)
            .map(|s| s.iter().copied().fold(0.0, f64::max))
            .collect()
    }

    /// Injects `fault` (tests of failure handling).
    pub fn inject(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    /// Full logits of the given rows after a forward pass (gathered from the ranks of the
    /// last stage).
    pub fn logits(&self, ids: &[u32], layout: &SeqLayout, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let batch = Batch {
            ids: ids.to_vec(),
            layout: layout.clone(),
            predictions: Vec::new(),
        };
        let vocab = self.config.vocab_size;
        let work = Work {
            batches: std::slice::from_ref(&batch),
            logits: Some(rows),
            cached: None,
        };
        let flat = self.run(work)?.remove(0);
        Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Runs every batch of `work` through every stage; the last stage's tensor-parallel rank 0
    /// returns each batch's NLLs or logits.
    fn run(&self, work: Work<'_>) -> Result<Vec<Vec<f32>>> {
        let batches = work.batches;
        if let Some((failed, cause)) = self.abort.cause() {
            return Err(Error::RankFailed { failed, cause });
        }
        let (tp, world) = (self.placement.tp(), self.placement.world_size());
        let mut senders: Vec<Option<SyncSender<Vec<f32>>>> = (0..world).map(|_| None).collect();
        let mut receivers: Vec<Option<Receiver<Vec<f32>>>> = (0..world).map(|_| None).collect();
        for rank in 0..world.saturating_sub(tp) {
            let (tx, rx) = sync_channel(IN_FLIGHT);
            senders[rank] = Some(tx);
            receivers[rank + tp] = Some(rx);
        }
        let results: Mutex<Vec<Option<Vec<f32>>>> = Mutex::new(vec![None; batches.len()]);
        std::thread::scope(|s| {
            for (rank, (tx, rx)) in senders.into_iter().zip(receivers).enumerate() {
                let results = &results;
                s.spawn(move || {
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        self.rank_loop(rank, work, rx, tx, results)
                    }));
                    match outcome {
                        Ok(Ok(())) | Ok(Err(Error::Aborted { .. })) => {}
                        Ok(Err(e)) => self.abort.raise(rank, e.to_string()),
                        Err(panic) => {
                            let message = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".into());
                            self.abort.raise(rank, format!("panicked: {message}"));
                        }
                    }
                });
            }
        });
        if let Some((failed, cause)) = self.abort.cause() {
            return Err(Error::RankFailed { failed, cause });
        }
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results
            .into_iter()
            .map(|r| r.ok_or_else(|| Error::Invalid("a batch produced no result".into())))
            .collect()
    }

    /// One rank's part of a call.
    fn rank_loop(
        &self,
        rank: usize,
        work: Work<'_>,
        from_previous: Option<Receiver<Vec<f32>>>,
        to_next: Option<SyncSender<Vec<f32>>>,
        results: &Mutex<Vec<Option<Vec<f32>>>>,
    ) -> Result<()> {
        let model = &self.ranks[rank];
        let backend = model.backend();
        let placement = model.placement();
        let hidden = self.config.hidden_size;
        let mut ws = Workspace::default();
        let mut busy = 0.0;
        let Work {
            batches,
            logits,
            cached,
        } = work;
        for (i, batch) in batches.iter().enumerate() {
            self.strike(rank, i)?;
            let mut x = match &from_previous {
                None => {
                    let start = Instant::now();
                    let x = model.embed(&batch.ids)?;
                    busy += start.elapsed().as_secs_f64();
                    x
                }
                Some(rx) => {
                    let values = receive(rx, &self.abort, rank)?;
                    backend.upload(&values, batch.ids.len(), hidden)?
                }
            };
            let start = Instant::now();
            match cached {
                Some(new) => model.run_layers_cached(&mut x, new, &mut ws)?,
                None => model.run_layers(&mut x, &model.context(&batch.layout)?, &mut ws)?,
            }
            if placement.is_last() {
                let h = model.finish(&x)?;
                let out = match logits {
                    Some(rows) => model.logits(&h, rows)?.concat(),
                    None => model.token_nll(&h, &batch.predictions)?,
                };
                if placement.shard.rank == 0 {
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(out);
                }
                busy += start.elapsed().as_secs_f64();
            } else {
                let values = backend.download(&x)?;
                busy += start.elapsed().as_secs_f64();
                let tx = to_next.as_ref().expect("every stage but the last has a next");
                if tx.send(values).is_err() {
                    // The next stage's rank is gone: it failed, or stopped because one did.
                    self.abort.check(rank)?;
                    return Err(Error::Invalid("the next stage ended early".into()));
                }
            }
        }
        self.busy_seconds.lock().unwrap_or_else(|e| e.into_inner())[rank] += busy;
        Ok(())
    }

    /// Applies the faults injected for `rank` before batch `batch`.
    fn strike(&self, rank: usize, batch: usize) -> Result<()> {
        for fault in self.faults.iter().filter(|f| f.rank == rank && f.batch == batch) {
            match fault.kind {
                FaultKind::Error => return Err(Error::Invalid("injected failure".into())),
                FaultKind::Panic => panic!("injected panic"),
                FaultKind::Collective => match &self.local_comms[rank] {
                    Some(comm) => comm.fail_next("injected collective failure"),
                    None => return Err(Error::Invalid("no collective to fail on this rank".into())),
                },
            }
        }
        Ok(())
    }
}

/// What one call of a group computes.
#[derive(Clone, Copy)]
struct Work<'a> {
    batches: &'a [Batch],
    /// Return the logits of these rows of each batch instead of the NLLs of its predictions.
    logits: Option<&'a [usize]>,
    /// Each batch holds `cached[s]` new tokens of each decoded sequence `s`: every rank runs
    /// its layers on its KV cache.
    cached: Option<&'a [usize]>,
}

impl<'a> Work<'a> {
    fn nll(batches: &'a [Batch]) -> Self {
        Work {
            batches,
            logits: None,
            cached: None,
        }
    }
}

/// The previous stage's activations, or an error once the group is aborted.
fn receive(rx: &Receiver<Vec<f32>>, abort: &Abort, rank: usize) -> Result<Vec<f32>> {
    loop {
        match rx.recv_timeout(Abort::POLL) {
            Ok(values) => return Ok(values),
            Err(RecvTimeoutError::Timeout) => abort.check(rank)?,
            Err(RecvTimeoutError::Disconnected) => {
                abort.check(rank)?;
                return Err(Error::Invalid("the previous stage ended early".into()));
            }
        }
    }
}

impl<B: Backend> Scorer for RankGroup<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn score(&self, ids: &[u32], layout: &SeqLayout, predictions: &[Prediction]) -> Result<Vec<f32>> {
        let batch = Batch {
            ids: ids.to_vec(),
            layout: layout.clone(),
            predictions: predictions.to_vec(),
        };
        Ok(self.run(Work::nll(std::slice::from_ref(&batch)))?.remove(0))
    }

    fn score_batches(&self, batches: &[Batch]) -> Result<Vec<Vec<f32>>> {
        self.run(Work::nll(batches))
    }

    fn logits_at(&self, ids: &[u32], layout: &SeqLayout, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.logits(ids, layout, rows)
    }
}

impl<B: Backend> Decoder for RankGroup<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn start(&self, sequences: usize, capacity: usize) -> Result<()> {
        self.ranks
            .iter()
            .try_for_each(|rank| rank.start_cache(sequences, capacity))
    }

    fn extend(&self, tokens: &[Vec<u32>]) -> Result<Vec<Option<Vec<f32>>>> {
        let new: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let active: Vec<usize> = new.iter().copied().filter(|&n| n > 0).collect();
        let (rows, slots) = last_rows(&new);
        let batch = Batch {
            ids: tokens.concat(),
            layout: SeqLayout::new(&active)?,
            predictions: Vec::new(),
        };
        let work = Work {
            batches: std::slice::from_ref(&batch),
            logits: Some(&rows),
            cached: Some(&new),
        };
        let flat = self.run(work)?.remove(0);
        let vocab = self.config.vocab_size;
        let logits = flat.chunks(vocab).map(<[f32]>::to_vec).collect();
        Ok(per_sequence(logits, &slots))
    }
}
