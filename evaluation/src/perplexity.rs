//! Perplexity over non-overlapping windows of a token stream, under the protocols that
//! AutoAWQ/GPTQ and llama.cpp use.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use tp_runtime::Scorer;
use tp_runtime::backend::{Prediction, SeqLayout};

use crate::{Error, Result};

/// Which predictions of a window are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// AutoAWQ / GPTQ: every next-token prediction of the window (`ctx - 1` of them).
    Full,
    /// `llama-perplexity`: the first token becomes BOS when the tokenizer adds one, and only
    /// predictions from position `ctx / 2` on are scored.
    #[serde(rename = "llamacpp")]
    LlamaCpp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Full => "full",
            Protocol::LlamaCpp => "llamacpp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Protocol::Full),
            "llamacpp" => Ok(Protocol::LlamaCpp),
            other => Err(format!("unknown protocol `{other}` (expected full or llamacpp)")),
        }
    }
}

/// How a token stream is cut into windows and which predictions count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowPlan {
    pub protocol: Protocol,
    pub ctx: usize,
    /// Windows that will be scored (the first ones of the stream).
    pub windows: usize,
    /// Whole windows the stream holds.
    pub windows_available: usize,
    /// BOS that replaces each window's first token (llamacpp protocol only).
    pub bos: Option<u32>,
}

impl WindowPlan {
    /// Plans `max_windows` (or all) windows of `ctx` tokens over `n_tokens` tokens.
    /// `bos` is the tokenizer's added BOS, used only by the llamacpp protocol.
    pub fn new(
        n_tokens: usize,
        ctx: usize,
        max_windows: Option<usize>,
        protocol: Protocol,
        bos: Option<u32>,
    ) -> Result<Self> {
        if ctx < 4 {
            return Err(Error::Invalid(format!(
                "context length {ctx} is too short (at least 4)"
            )));
        }
        let available = n_tokens / ctx;
        if available == 0 {
            return Err(Error::Invalid(format!(
                "the data has {n_tokens} tokens, fewer than one window of {ctx}"
            )));
        }
        let windows = match max_windows {
            Some(0) => return Err(Error::Invalid("--windows must be at least 1".into())),
            Some(k) => k.min(available),
            None => available,
        };
        Ok(WindowPlan {
            protocol,
            ctx,
            windows,
            windows_available: available,
            bos: if protocol == Protocol::LlamaCpp { bos } else { None },
        })
    }

    /// Position of the first scored prediction in a window.
    pub fn first_scored(&self) -> usize {
        match self.protocol {
            Protocol::Full => 0,
            Protocol::LlamaCpp => self.ctx / 2,
        }
    }

    /// Predictions scored per window.
    pub fn predictions_per_window(&self) -> usize {
        self.ctx - 1 - self.first_scored()
    }

    /// The input ids of window `index` and the predictions to score (rows relative to the
    /// window). Targets are always the original tokens.
    pub fn window(&self, tokens: &[u32], index: usize) -> (Vec<u32>, Vec<Prediction>) {
        let window = &tokens[index * self.ctx..(index + 1) * self.ctx];
        let mut input = window.to_vec();
        if let Some(bos) = self.bos {
            input[0] = bos;
        }
        let predictions = (self.first_scored()..self.ctx - 1)
            .map(|row| Prediction {
                row,
                target: window[row + 1],
            })
            .collect();
        (input, predictions)
    }
}

/// The score of one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowScore {
    pub index: usize,
    pub nll_sum: f64,
    pub predictions: usize,
}

impl WindowScore {
    /// Mean NLL over the window's predictions.
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.predictions as f64
    }
}

/// A running or final perplexity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub nll_sum: f64,
    pub predictions: usize,
    pub windows: usize,
    pub tokens_processed: usize,
    pub seconds: f64,
}

impl Tally {
    /// Mean NLL per prediction.
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.predictions as f64
    }

    /// `exp(mean NLL)`.
    pub fn ppl(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Forward-pass throughput.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens_processed as f64 / self.seconds
    }
}

/// The outcome of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PerplexityResult {
    pub plan: WindowPlan,
    pub ppl: f64,
    pub mean_nll: f64,
    pub predictions: usize,
    pub tokens_processed: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub windows: Vec<WindowScore>,
}

/// Scores the windows of `plan` over `tokens`, `batch` windows per forward pass, calling
/// `on_window` after each window with its score and the running tally.
pub fn evaluate<S: Scorer + ?Sized>(
    model: &S,
    tokens: &[u32],
    plan: &WindowPlan,
    batch: usize,
    mut on_window: impl FnMut(&WindowScore, &Tally),
) -> Result<PerplexityResult> {
    if plan.windows * plan.ctx > tokens.len() {
        return Err(Error::Invalid(
            "the window plan does not fit the token stream".into(),
        ));
    }
    let batch = batch.max(1);
    let start = Instant::now();
    let mut tally = Tally::default();
    let mut scores = Vec::with_capacity(plan.windows);
    let indices: Vec<usize> = (0..plan.windows).collect();
    for group in indices.chunks(batch) {
        let mut ids = Vec::with_capacity(group.len() * plan.ctx);
        let mut predictions = Vec::new();
        let mut spans = Vec::new();
        for (slot, &index) in group.iter().enumerate() {
            let (input, preds) = plan.window(tokens, index);
            ids.extend(input);
            let first = predictions.len();
            predictions.extend(preds.into_iter().map(|p| Prediction {
                row: p.row + slot * plan.ctx,
                target: p.target,
            }));
            spans.push((index, first..predictions.len()));
        }
        let layout = SeqLayout::new(&vec![plan.ctx; group.len()]).map_err(tp_runtime::Error::from)?;
        let nll = model.score(&ids, &layout, &predictions)?;
        for (index, span) in spans {
            let score = WindowScore {
                index,
                nll_sum: nll[span.clone()].iter().map(|&v| v as f64).sum(),
                predictions: span.len(),
            };
            tally.nll_sum += score.nll_sum;
            tally.predictions += score.predictions;
            tally.windows += 1;
            tally.tokens_processed += plan.ctx;
            tally.seconds = start.elapsed().as_secs_f64();
            on_window(&score, &tally);
            scores.push(score);
        }
    }
    Ok(PerplexityResult {
        plan: plan.clone(),
        ppl: tally.ppl(),
        mean_nll: tally.mean_nll(),
        predictions: tally.predictions,
        tokens_processed: tally.tokens_processed,
        seconds: tally.seconds,
        tokens_per_second: tally.tokens_per_second(),
        windows: scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_protocol_scores_every_prediction() {
        let tokens: Vec<u32> = (0..25).collect();
        let plan = WindowPlan::new(tokens.len(), 8, None, Protocol::Full, Some(99)).unwrap();
        assert_eq!((plan.windows, plan.windows_available, plan.bos), (3, 3, None));
        let (input, preds) = plan.window(&tokens, 1);
        assert_eq!(input, (8..16).collect::<Vec<_>>());
        assert_eq!(preds.len(), 7);
        assert_eq!(preds[0], Prediction { row: 0, target: 9 });
        assert_eq!(preds[6], Prediction { row: 6, target: 15 });
    }

    #[test]
    fn llamacpp_protocol_scores_second_half_after_bos() {
        let tokens: Vec<u32> = (10..30).collect();
        let plan = WindowPlan::new(tokens.len(), 8, Some(1), Protocol::LlamaCpp, Some(1)).unwrap();
        let (input, preds) = plan.window(&tokens, 0);
        assert_eq!(input[0], 1);
        assert_eq!(&input[1..], &tokens[1..8]);
        assert_eq!(plan.predictions_per_window(), 3);
        assert_eq!(preds.iter().map(|p| p.row).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(preds[0].target, tokens[5]);
    }

    #[test]
    fn bad_plans_are_errors() {
        assert!(WindowPlan::new(5, 8, None, Protocol::Full, None).is_err());
        assert!(WindowPlan::new(50, 2, None, Protocol::Full, None).is_err());
        assert!(WindowPlan::new(50, 8, Some(0), Protocol::Full, None).is_err());
        assert_eq!(
            WindowPlan::new(50, 8, Some(100), Protocol::Full, None)
                .unwrap()
                .windows,
            6
        );
    }
}
