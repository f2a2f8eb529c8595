//! The generation loop: all prompts prefilled in one pass, then one decode step per new token
//! in which every unfinished sequence advances by one token (finished ones sit out), each
//! with its own sampler, until its stop token or the limit.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tp_runtime::Decoder;

use crate::sampler::{Sampler, Sampling};
use crate::{Error, Result};

/// What to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// New tokens at most per sequence.
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end a sequence (kept as its last token, as transformers does).
    pub stop: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It produced a stop token.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

/// One sequence's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    pub stop: StopReason,
}

/// The sequences generated together, with the time the passes took.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub sequences: Vec<Sequence>,
    /// The prefill pass over every prompt (it gives each sequence's first new token).
    pub prefill_seconds: f64,
    pub prefill_tokens: usize,
    /// The decode steps after it.
    pub decode_seconds: f64,
    pub decode_steps: usize,
    /// Tokens fed to decode steps, all sequences together.
    pub decode_tokens: usize,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_seconds.max(f64::MIN_POSITIVE)
    }

    /// Tokens per second of the decode steps, all sequences together.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_seconds.max(f64::MIN_POSITIVE)
    }
}

/// Generates a continuation of each prompt, all decoded together; `on_token(s, id)` sees each
/// new token of sequence `s` as it is chosen.
pub fn generate_batch(
    decoder: &dyn Decoder,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generation> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("every prompt needs at least one token".into()));
    }
    let config = decoder.config();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = longest + options.max_new_tokens;
    if let Some(limit) = config.max_position_embeddings
        && capacity > limit
    {
        return Err(Error::Invalid(format!(
            "{longest} prompt tokens + {} new ones exceed the model's {limit} positions (max_position_embeddings)",
            options.max_new_tokens
        )));
    }
    let mut samplers = (0..prompts.len() as u64)
        .map(|s| Sampler::new(options.sampling, s))
        .collect::<Result<Vec<_>>>()?;
    let mut sequences: Vec<Sequence> = prompts
        .iter()
        .map(|p| Sequence {
            prompt_ids: p.clone(),
            new_ids: Vec::new(),
            stop: StopReason::Length,
        })
        .collect();
    let mut done = vec![options.max_new_tokens == 0; prompts.len()];
    if done.iter().all(|&d| d) {
        return Ok(Generation {
            sequences,
            prefill_seconds: 0.0,
            prefill_tokens: 0,
            decode_seconds: 0.0,
            decode_steps: 0,
            decode_tokens: 0,
        });
    }
    decoder.start(prompts.len(), capacity)?;
    let start = Instant::now();
    let mut logits = decoder.extend(prompts)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let (mut decode_seconds, mut decode_steps, mut decode_tokens) = (0.0, 0, 0);
    loop {
        // Choose each running sequence's next token from its logits.
        let mut feed: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        for s in 0..prompts.len() {
            if done[s] {
                continue;
            }
            let row = logits[s]
                .as_ref()
                .ok_or_else(|| Error::Invalid(format!("no logits for running sequence {s}")))?;
            let id = samplers[s].next(row);
            sequences[s].new_ids.push(id);
            on_token(s, id)?;
            if options.stop.contains(&id) {
                sequences[s].stop = StopReason::Stop;
                done[s] = true;
            } else if sequences[s].new_ids.len() == options.max_new_tokens {
                done[s] = true;
            } else {
                feed[s].push(id);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let step = Instant::now();
        logits = decoder.extend(&feed)?;
        decode_seconds += step.elapsed().as_secs_f64();
        decode_steps += 1;
        decode_tokens += feed.iter().map(Vec::len).sum::<usize>();
    }
    Ok(Generation {
        sequences,
        prefill_seconds,
        prefill_tokens: prompts.iter().map(Vec::len).sum(),
        decode_seconds,
        decode_steps,
        decode_tokens,
    })
}

/// [`generate_batch`] of one prompt; `on_token` sees each new token.
pub fn generate(
    decoder: &dyn Decoder,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    generate_batch(decoder, &[prompt.to_vec()], options, |_, id| on_token(id))
}
