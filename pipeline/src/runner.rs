//! Runs a validated job step by step: import (GGUF) → evaluations of the original → quantize
//! → evaluations of the quantized model → report. Every step writes atomically and is
//! recorded in the manifest; a step already recorded with the same fingerprint and intact
//! outputs is skipped, so a finished job reruns as a no-op and a killed one resumes.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use checkpoint::gguf::{OutputDtype, import_gguf};
use evaluation::provenance::{self, FileDigest};
use evaluation::report::SCHEMA_VERSION;
use evaluation::{Device, EvalRequest};
use serde_json::json;
use tp_runtime::Compute;

use crate::job::{BackendKind, EvalKind, EvalModel, ImportDtype, Job, Source};
use crate::lock::lock_folder;
use crate::manifest::{DigestCache, JobRecord, MANIFEST, Manifest, StepRecord, outputs_intact, relative};
use crate::progress::{self, Progress, log};
use crate::report;

/// One step of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Import,
    Eval(usize),
    Quantize,
    Report,
}

impl Step {
    /// The step's name in the manifest and in logs.
    pub fn name(self, job: &Job) -> String {
        match self {
            Step::Import => "import".into(),
            Step::Eval(i) => format!("eval-{i}-{}", job.evals[i].model),
            Step::Quantize => "quantize".into(),
            Step::Report => "report".into(),
        }
    }
}

/// The steps of a job, in order.
pub fn steps(job: &Job) -> Vec<Step> {
    let mut steps = Vec::new();
    if matches!(job.source, Source::Gguf(_)) {
        steps.push(Step::Import);
    }
    let evals = |model: EvalModel| {
        job.evals
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.model == model)
            .map(|(i, _)| Step::Eval(i))
    };
    steps.extend(evals(EvalModel::Original));
    if job.quant.is_some() {
        steps.push(Step::Quantize);
    }
    steps.extend(evals(EvalModel::Quantized));
    steps.push(Step::Report);
    steps
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub ran: Vec<String>,
    pub skipped: Vec<String>,
    pub seconds: f64,
}

/// The first twelve characters of a hash, for messages (all of it if it is shorter: a
/// hand-edited manifest must not make this panic).
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Makes sure `out` is this job's folder (or a new one) and removes leftovers of killed runs.
fn claim_output(job: &Job, force: bool) -> Result<Manifest> {
    let out = &job.out_dir;
    let record = JobRecord {
        file: job.file.display().to_string(),
        name: job.name.clone(),
        canonical_sha256: job.canonical_hash.clone(),
    };
    let seed = job
        .quant
        .as_ref()
        .filter(|q| q.options.method == awq_pack::Method::Awq)
        .map(|q| q.options.calib.seed);
    if force && out.exists() {
        log(format!("--force: removing {}", out.display()));
        std::fs::remove_dir_all(out).with_context(|| format!("{}: cannot remove", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let manifest = match Manifest::read(out)? {
        // Steps recorded by a tool whose reports had another layout are run again.
        Some(m) if m.job.canonical_sha256 == job.canonical_hash && m.schema_version != SCHEMA_VERSION => {
            log(format!(
                "{}: its steps were recorded with report schema {}; running them again (schema {SCHEMA_VERSION})",
                out.display(),
                m.schema_version
            ));
            Manifest::new(record, seed)
        }
        Some(m) if m.job.canonical_sha256 == job.canonical_hash => m,
        Some(m) => bail!(
            "{}: holds the outputs of another job ({}, canonical hash {}); this job's hash is {}. Choose another [output] dir or pass --force",
            out.display(),
            m.job.file,
            short(&m.job.canonical_sha256),
            short(&job.canonical_hash)
        ),
        None if checkpoint::atomic::is_occupied(out) && !only_partials(out)? => bail!(
            "{}: is not empty and has no {MANIFEST}; refusing to overwrite it (pass --force)",
            out.display()
        ),
        None => Manifest::new(record, seed),
    };
    for entry in std::fs::read_dir(out)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().contains(".partial-") {
            log(format!(
                "removing the leftover {} of an interrupted run",
                entry.path().display()
            ));
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .with_context(|| format!("{}: cannot remove", p.display()))?;
        }
    }
    Ok(manifest)
}

fn only_partials(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .all(|e| e.file_name().to_string_lossy().contains(".partial-")))
}

/// The settings and input files that decide a step's result.
fn step_inputs(
    job: &Job,
    step: Step,
    cache: &mut DigestCache,
) -> Result<(serde_json::Value, Vec<FileDigest>)> {
    let out = &job.out_dir;
    Ok(match step {
        Step::Import => {
            let Source::Gguf(gguf) = &job.source else {
                unreachable!("import only for GGUF sources")
            };
            (
                json!({"dtype": format!("{:?}", job.import_dtype)}),
                vec![cache.file(gguf)?],
            )
        }
        Step::Eval(i) => {
            let e = &job.evals[i];
            let mut inputs = cache.dir(&job.eval_model_dir(i))?;
            if e.kind == EvalKind::Kl {
                inputs.extend(cache.dir(&job.original_dir())?);
            }
            inputs.push(cache.file(&e.data)?);
            let mut config = serde_json::to_value(e)?;
            // The arithmetic this machine resolves for the scored model decides the result;
            // f32 (the only path before there was a choice) keeps earlier fingerprints.
            let compute = tp_runtime::loaded::resolve_compute(&job.eval_model_dir(i), job.runtime.compute)?;
            if compute != Compute::F32 {
                config["compute"] = json!(compute);
            }
            (config, inputs)
        }
        Step::Quantize => {
            let q = job.quant.as_ref().expect("quantize step only with [quant]");
            let mut inputs = cache.dir(&job.original_dir())?;
            if let Some(c) = &q.calib_path {
                inputs.push(cache.file(c)?);
            }
            let o = &q.options;
            let mut config = json!({
                "method": o.method, "group_size": o.group_size, "scaling": o.scaling, "clip": o.clip,
                "calibration": o.calib, "modules_to_not_convert": o.modules_to_not_convert,
            });
            if o.compute != Compute::F32 {
                config["compute"] = json!(o.compute);
            }
            if let Some(part) = o.part {
                config["part"] = json!(part.to_string());
            }
            (config, inputs)
        }
        Step::Report => {
            let mut inputs = Vec::new();
            for i in 0..job.evals.len() {
                inputs.push(cache.file(&job.eval_report(i))?);
            }
            if job.quant.is_some() {
                inputs.push(cache.file(&job.quantize_report())?);
            }
            (json!({"job": job.canonical_hash}), relative(inputs, out))
        }
    })
}

fn fingerprint(name: &str, config: &serde_json::Value, inputs: &[FileDigest]) -> String {
    let digests: Vec<(&str, &str)> = inputs
        .iter()
        .map(|d| (d.path.as_str(), d.sha256.as_str()))
        .collect();
    let text = json!({"step": name, "config": config, "inputs": digests}).to_string();
    checkpoint::digest::sha256_bytes(text.as_bytes())
}

/// Runs one step; returns the paths it wrote (files or folders) inside the output folder.
fn run_step(job: &Job, step: Step) -> Result<Vec<PathBuf>> {
    match step {
        Step::Import => {
            let Source::Gguf(gguf) = &job.source else {
                unreachable!("import only for GGUF sources")
            };
            let dtype = match job.import_dtype {
                ImportDtype::F32 => OutputDtype::F32,
                ImportDtype::F16 => OutputDtype::F16,
                ImportDtype::Bf16 => OutputDtype::BF16,
            };
            import_gguf(
                gguf,
                &job.imported_dir(),
                dtype,
                true,
                checkpoint::writer::DEFAULT_MAX_SHARD_BYTES,
            )?;
            Ok(vec![job.imported_dir()])
        }
        Step::Eval(i) => {
            let e = &job.evals[i];
            let request = EvalRequest {
                model: job.eval_model_dir(i),
                data: e.data.clone(),
                ctx: e.ctx,
                windows: e.windows,
                protocol: e.protocol,
                batch: e.batch,
                device: match job.runtime.backend {
                    BackendKind::Cpu => Device::Cpu,
                    BackendKind::Cuda => Device::Cuda,
                },
                placement: job.eval_placement(i).request.clone(),
                kl_base: (e.kind == EvalKind::Kl).then(|| job.original_dir()),
                compute: job.runtime.compute,
            };
            let report = progress::evaluate(&request)?;
            log(format!(
                "{}: PPL {:.4} ({} windows of {}, {})",
                step.name(job),
                report.ppl,
                report.windows,
                report.ctx,
                report.protocol
            ));
            let path = job.eval_report(i);
            evaluation::report::write(&path, &report)?;
            Ok(vec![path])
        }
        Step::Quantize => {
            let q = job.quant.as_ref().expect("quantize step only with [quant]");
            let run = progress::quantize(
                &job.original_dir(),
                &job.quantized_dir(),
                &q.options,
                q.calib_path.as_deref(),
            )?;
            let path = job.quantize_report();
            evaluation::report::write(&path, &run)?;
            Ok(vec![job.quantized_dir(), path])
        }
        Step::Report => report::write(job),
    }
}

/// Digests of what a step wrote (folders expanded to their files), relative to `out`.
fn output_digests(paths: &[PathBuf], out: &Path, cache: &mut DigestCache) -> Result<Vec<FileDigest>> {
    let mut digests = Vec::new();
    for p in paths {
        if p.is_dir() {
            digests.extend(cache.dir(p)?);
        } else {
            digests.push(cache.file(p)?);
        }
    }
    Ok(relative(digests, out))
}

/// How a job is run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Start over: remove the output folder first.
    pub force: bool,
    /// When another run holds the output folder, wait for it rather than fail.
    pub wait: bool,
}

/// Runs every step of `job` that is not already done, holding its output folder's lock.
pub fn run_job(job: &Job, options: RunOptions) -> Result<Outcome> {
    let start = Instant::now();
    let _lock = lock_folder(&job.out_dir, options.wait)?;
    let mut manifest = claim_output(job, options.force)?;
    let mut cache = DigestCache::default();
    let steps = steps(job);
    let mut outcome = Outcome {
        ran: Vec::new(),
        skipped: Vec::new(),
        seconds: 0.0,
    };
    let bar = Progress::bar_only("steps", steps.len() as u64);
    for (n, &step) in steps.iter().enumerate() {
        let name = step.name(job);
        bar.update(n as u64, name.clone());
        let (config, inputs) = step_inputs(job, step, &mut cache)?;
        let fp = fingerprint(&name, &config, &inputs);
        if let Some(record) = manifest.steps.get(&name)
            && record.fingerprint == fp
            && outputs_intact(record, &job.out_dir, &mut cache)
        {
            log(format!(
                "step {}/{} {name}: up to date, skipped",
                n + 1,
                steps.len()
            ));
            outcome.skipped.push(name);
            continue;
        }
        log(format!("step {}/{} {name}: running", n + 1, steps.len()));
        // A stale record must not survive a failed rerun of its step.
        if manifest.steps.remove(&name).is_some() {
            manifest.write(&job.out_dir)?;
        }
        let step_start = Instant::now();
        // The previous step's freed buffers go back to the kernel first: the allocator keeps
        // them for reuse, and they would otherwise count in this step's peak.
        cpu_kernels::release_freed_memory();
        provenance::reset_peak_rss();
        let written = run_step(job, step).with_context(|| format!("step {name}"))?;
        let record = StepRecord {
            fingerprint: fp,
            inputs,
            outputs: output_digests(&written, &job.out_dir, &mut cache)?,
            seconds: step_start.elapsed().as_secs_f64(),
            finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        log(format!(
            "step {}/{} {name}: done in {:.1}s",
            n + 1,
            steps.len(),
            record.seconds
        ));
        manifest.steps.insert(name.clone(), record);
        manifest.write(&job.out_dir)?;
        outcome.ran.push(name);
    }
    bar.finish();
    outcome.seconds = start.elapsed().as_secs_f64();
    if outcome.ran.is_empty() {
        log(format!(
            "nothing to do: all {} steps of {} are up to date in {}",
            steps.len(),
            job.name,
            job.out_dir.display()
        ));
    }
    Ok(outcome)
}
