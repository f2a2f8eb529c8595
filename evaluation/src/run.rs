//! Measured runs: a checkpoint's perplexity and a generation, each with the provenance that
//! makes its numbers reproducible (tool, machine, threads, digests of every input, peak
//! memory). A quantization run is recorded the same way, from these provenance helpers, by
//! the job runner that composes quantization and evaluation (`pipeline`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use checkpoint::{ModelConfig, Tokenizer};
use generation::{ChatTemplate, GenerateOptions, Message, Sampling, TextStream, generate, stop_tokens};
use tp_runtime::loaded;
pub use tp_runtime::loaded::Device;
use tp_runtime::{ComputeRequest, Placement, PlacementRequest};

use crate::kl::{KlStats, kl_divergence};
use crate::perplexity::{PerplexityResult, Protocol, Tally, WindowPlan, WindowScore, evaluate};
use crate::provenance;
use crate::report::{DataInfo, EvalReport, GenerateReport, KlSection, ModelInfo, SCHEMA_VERSION};
use crate::{Error, Result};

/// What to evaluate, and how.
#[derive(Clone, Debug)]
pub struct EvalRequest {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    pub model: PathBuf,
    /// UTF-8 text, tokenized whole without special tokens.
    pub data: PathBuf,
    pub ctx: usize,
    /// Score only the first windows (default: all).
    pub windows: Option<usize>,
    pub protocol: Protocol,
    /// Windows per forward pass.
    pub batch: usize,
    pub device: Device,
    /// Tensor and pipeline parallelism (a pre-sharded folder brings its own).
    pub placement: PlacementRequest,
    /// Compare the model's token distributions with this base model's on the same windows
    /// (KL divergence); both are loaded at once, on the same device and placement.
    pub kl_base: Option<PathBuf>,
    /// The arithmetic of CPU matrix products (each model resolves `auto` by itself).
    pub compute: ComputeRequest,
}

/// Progress of an evaluation.
pub enum EvalEvent<'a> {
    /// The text is tokenized and the windows are planned.
    Planned { tokens: usize, plan: &'a WindowPlan },
    /// A window was scored.
    Window {
        score: &'a WindowScore,
        tally: &'a Tally,
    },
    /// A window was compared with the base model (`kl_base`).
    Compared {
        windows: usize,
        of: usize,
        mean_kld: f64,
    },
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::file(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// What scoring with a loaded model produced.
struct Scored {
    result: PerplexityResult,
    kl: Option<KlStats>,
    backend: String,
    placement: Placement,
    rank_weight_bytes: Vec<usize>,
    rank_loaded_bytes: Vec<u64>,
    stage_seconds: Option<Vec<f64>>,
    load_seconds: f64,
}

/// The perplexity part of a comparison (the model's own NLLs, from full logits).
fn perplexity_of(stats: &KlStats, plan: &WindowPlan) -> PerplexityResult {
    let per_window = plan.predictions_per_window();
    let windows: Vec<WindowScore> = stats
        .window_mean_nll
        .iter()
        .enumerate()
        .map(|(index, &mean)| WindowScore {
            index,
            nll_sum: mean * per_window as f64,
            predictions: per_window,
        })
        .collect();
    let tokens_processed = plan.windows * plan.ctx;
    PerplexityResult {
        plan: plan.clone(),
        ppl: stats.ppl,
        mean_nll: stats.ppl.ln(),
        predictions: stats.predictions,
        tokens_processed,
        seconds: stats.seconds,
        tokens_per_second: tokens_processed as f64 / stats.seconds,
        windows,
    }
}

fn load_and_score(
    request: &EvalRequest,
    tokens: &[u32],
    plan: &WindowPlan,
    mut on_event: impl FnMut(EvalEvent<'_>),
) -> Result<Scored> {
    let load = Instant::now();
    let model = loaded::load(
        &request.model,
        request.device,
        request.compute,
        &request.placement,
    )?;
    let base = match &request.kl_base {
        Some(dir) => Some(loaded::load(
            dir,
            request.device,
            request.compute,
            &request.placement,
        )?),
        None => None,
    };
    let load_seconds = load.elapsed().as_secs_f64();
    let (result, kl) = match &base {
        None => {
            let result = evaluate(model.as_ref(), tokens, plan, request.batch, |score, tally| {
                on_event(EvalEvent::Window { score, tally })
            })?;
            (result, None)
        }
        Some(base) => {
            let stats = kl_divergence(
                base.as_ref(),
                model.as_ref(),
                tokens,
                plan,
                |windows, mean_kld| {
                    on_event(EvalEvent::Compared {
                        windows,
                        of: plan.windows,
                        mean_kld,
                    })
                },
            )?;
            (perplexity_of(&stats, plan), Some(stats))
        }
    };
    Ok(Scored {
        result,
        kl,
        backend: model.backend_name(),
        placement: model.placement(),
        rank_weight_bytes: model.rank_weight_bytes(),
        rank_loaded_bytes: model.rank_loaded_bytes(),
        stage_seconds: model.stage_seconds(),
        load_seconds,
    })
}

/// Loads, tokenizes and scores a checkpoint; the report holds the perplexity and its
/// provenance.
pub fn evaluate_checkpoint(
    request: &EvalRequest,
    mut on_event: impl FnMut(EvalEvent<'_>),
) -> Result<EvalReport> {
    let wall = Instant::now();
    // Checked before any weight is read or any text tokenized.
    let config = ModelConfig::from_file(&request.model.join("config.json"))?;
    let placement = loaded::resolve(&request.model, &request.placement)?;
    loaded::check_device(request.device, placement.world_size())?;
    let tokenizer = Tokenizer::from_dir(&request.model)?;
    let text = read_text(&request.data)?;
    let tokens = tokenizer.encode(&text, false)?;
    if let Some(base) = &request.kl_base {
        // Both models must read the same ids: the base's tokenizer must agree.
        let base_tokens = Tokenizer::from_dir(base)?.encode(&text, false)?;
        if base_tokens != tokens {
            return Err(Error::Invalid(format!(
                "{} and the base model {} tokenize {} differently: their distributions cannot be compared",
                request.model.display(),
                base.display(),
                request.data.display()
            )));
        }
    }
    let plan = WindowPlan::new(
        tokens.len(),
        request.ctx,
        request.windows,
        request.protocol,
        tokenizer.added_bos()?,
    )
    .map_err(|e| Error::file(&request.data, format!("{} tokens: {e}", tokens.len())))?;
    on_event(EvalEvent::Planned {
        tokens: tokens.len(),
        plan: &plan,
    });
    let scored = load_and_score(request, &tokens, &plan, &mut on_event)?;
    let result = scored.result;
    let kl = match (&request.kl_base, scored.kl) {
        (Some(dir), Some(stats)) => Some(KlSection {
            base: ModelInfo {
                dir: dir.display().to_string(),
                config: ModelConfig::from_file(&dir.join("config.json"))?,
                files: provenance::digest_dir(dir)?,
            },
            stats,
        }),
        _ => None,
    };
    Ok(EvalReport {
        schema_version: SCHEMA_VERSION,
        kind: if kl.is_some() { "kl" } else { "perplexity" }.into(),
        tool: provenance::tool(),
        machine: provenance::machine(),
        backend: scored.backend,
        threads: rayon::current_num_threads(),
        layer_stages: (0..config.num_hidden_layers)
            .map(|l| scored.placement.stages.stage_of(l).unwrap_or(0))
            .collect(),
        placement: scored.placement,
        rank_weight_bytes: scored.rank_weight_bytes,
        rank_loaded_bytes: scored.rank_loaded_bytes,
        stage_seconds: scored.stage_seconds,
        model: ModelInfo {
            dir: request.model.display().to_string(),
            config,
            files: provenance::digest_dir(&request.model)?,
        },
        tokenizer: provenance::digest(tokenizer.path())?,
        data: DataInfo {
            file: provenance::digest(&request.data)?,
            tokens: tokens.len(),
        },
        protocol: plan.protocol,
        ctx: plan.ctx,
        windows: plan.windows,
        windows_available: plan.windows_available,
        bos: plan.bos,
        ppl: result.ppl,
        mean_nll: result.mean_nll,
        predictions: result.predictions,
        per_window_mean_nll: result.windows.iter().map(|w| w.mean_nll()).collect(),
        tokens_processed: result.tokens_processed,
        eval_seconds: result.seconds,
        tokens_per_second: result.tokens_per_second,
        load_seconds: scored.load_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        peak_rss_bytes: provenance::peak_rss_bytes(),
        kl,
    })
}

/// What to generate, and where.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub model: PathBuf,
    /// The user's text; with `chat`, the one user message of a conversation rendered by the
    /// checkpoint's chat template (after `system`, if given).
    pub prompt: String,
    pub chat: bool,
    pub system: Option<String>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub device: Device,
    pub placement: PlacementRequest,
}

/// Loads a model and generates a reply to one prompt; `on_text` sees the text as it is
/// produced.
pub fn generate_text(request: &GenerateRequest, mut on_text: impl FnMut(&str)) -> Result<GenerateReport> {
    request.sampling.validate()?;
    let placement = loaded::resolve(&request.model, &request.placement)?;
    loaded::check_device(request.device, placement.world_size())?;
    let tokenizer = Tokenizer::from_dir(&request.model)?;
    let (rendered, prompt_ids) = if request.chat {
        let template = ChatTemplate::from_dir(&request.model)?;
        let mut messages: Vec<Message> = request.system.iter().map(|s| Message::new("system", s)).collect();
        messages.push(Message::new("user", &request.prompt));
        let text = template.render(&messages, true)?;
        // The template writes the special tokens itself, as transformers' apply_chat_template.
        let ids = tokenizer.encode(&text, false)?;
        (text, ids)
    } else {
        let ids = tokenizer.encode(&request.prompt, true)?;
        (request.prompt.clone(), ids)
    };
    if prompt_ids.is_empty() {
        return Err(Error::Invalid("the prompt encodes to no tokens".into()));
    }
    let stop = stop_tokens(&request.model, &tokenizer)?;
    let load = Instant::now();
    // Decoding steps are a few rows, which always compute in f32; prompts too, so that a
    // generation does not depend on the CPU it ran on.
    let model = loaded::load(
        &request.model,
        request.device,
        ComputeRequest::F32,
        &request.placement,
    )?;
    let load_seconds = load.elapsed().as_secs_f64();
    let options = GenerateOptions {
        max_new_tokens: request.max_new_tokens,
        sampling: request.sampling,
        stop: stop.clone(),
    };
    let mut stream = TextStream::new(&tokenizer);
    let generation = generate(model.as_ref(), &prompt_ids, &options, |id| {
        on_text(&stream.push(id)?);
        Ok(())
    })?;
    on_text(&stream.flush()?);
    let sequence = &generation.sequences[0];
    Ok(GenerateReport {
        schema_version: SCHEMA_VERSION,
        kind: "generation".into(),
        tool: provenance::tool(),
        machine: provenance::machine(),
        backend: model.backend_name(),
        threads: rayon::current_num_threads(),
        placement: model.placement(),
        model: ModelInfo {
            dir: request.model.display().to_string(),
            config: ModelConfig::from_file(&request.model.join("config.json"))?,
            files: provenance::digest_dir(&request.model)?,
        },
        prompt: request.prompt.clone(),
        chat: request.chat,
        rendered_prompt: rendered,
        prompt_ids,
        new_ids: sequence.new_ids.clone(),
        text: stream.text()?,
        stop: sequence.stop,
        stop_tokens: stop,
        sampling: request.sampling,
        max_new_tokens: request.max_new_tokens,
        prefill_seconds: generation.prefill_seconds,
        prefill_tokens_per_second: generation.prefill_tokens_per_second(),
        decode_tokens: generation.decode_tokens,
        decode_seconds: generation.decode_seconds,
        decode_tokens_per_second: generation.decode_tokens_per_second(),
        load_seconds,
        peak_rss_bytes: provenance::peak_rss_bytes(),
    })
}
