//! Generation on SmolLM2-135M-Instruct, f32 and an AWQ-format g64 checkpoint (round to
//! nearest, made in seconds), on one rank and split:
//! - every logit a decode step computes from the KV cache equals the full forward pass over
//!   the same tokens within 1e-4, at tp = 3, pp = 2 and tp 3 × pp 2 too;
//! - greedy generation through the cache gives the tokens of greedy decoding by full forward
//!   passes (argmax over the whole sequence's logits at every step). Our full-forward logits
//!   are transformers' (evaluation/tests/smollm2.rs: window 0's NLL and top-5 logits within
//!   1e-4; tp-runtime/tests/tiny_models.rs), so where the top two logits differ by more than
//!   that, this is transformers' greedy output; the smallest margin is printed;
//! - several prompts decoded together give each prompt's own tokens, and seeded sampling
//!   repeats.

use std::path::Path;

use awq_pack::{GroupSize, QuantizeOptions, quantize};
use checkpoint::Tokenizer;
use generation::sampler::argmax;
use generation::{ChatTemplate, GenerateOptions, Message, Sampling, generate, generate_batch, stop_tokens};
use tp_runtime::{CpuBackend, Decoder, Model, PlacementRequest, RankGroup, SeqLayout};

const NEW: usize = 24;

fn prompts(model: &Path) -> Vec<Vec<u32>> {
    let tokenizer = Tokenizer::from_dir(model).unwrap();
    let template = ChatTemplate::from_dir(model).unwrap();
    [
        "What is the capital of France?",
        "Write a haiku about rain.",
        "List three prime numbers.",
    ]
    .iter()
    .map(|q| {
        let text = template.render(&[Message::new("user", q)], true).unwrap();
        tokenizer.encode(&text, false).unwrap()
    })
    .collect()
}

fn full_logits(model: &Model<CpuBackend>, ids: &[u32], rows: &[usize]) -> Vec<Vec<f32>> {
    let hidden = model
        .forward(ids, &SeqLayout::single(ids.len()).unwrap())
        .unwrap();
    model.logits(&hidden, rows).unwrap()
}

/// Greedy tokens by full forward passes, and the smallest gap between the top two logits.
fn greedy_by_full_passes(model: &Model<CpuBackend>, prompt: &[u32], stop: &[u32]) -> (Vec<u32>, f32) {
    let mut ids = prompt.to_vec();
    let mut margin = f32::INFINITY;
    for _ in 0..NEW {
        let logits = full_logits(model, &ids, &[ids.len() - 1]).remove(0);
        let best = argmax(&logits);
        let second = logits
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != best as usize)
            .map(|(_, &l)| l)
            .fold(f32::NEG_INFINITY, f32::max);
        margin = margin.min(logits[best as usize] - second);
        ids.push(best);
        if stop.contains(&best) {
            break;
        }
    }
    (ids[prompt.len()..].to_vec(), margin)
}

/// Decodes `tokens` after `prompt` through `decoder`'s cache; the largest difference from the
/// full pass's logits at every position from the prompt's last on.
fn decode_vs_full(decoder: &dyn Decoder, prompt: &[u32], tokens: &[u32], want: &[Vec<f32>]) -> f32 {
    decoder.start(1, prompt.len() + tokens.len() + 1).unwrap();
    let mut got = vec![decoder.extend(&[prompt.to_vec()]).unwrap().remove(0).unwrap()];
    for &t in tokens {
        got.push(decoder.extend(&[vec![t]]).unwrap().remove(0).unwrap());
    }
    got.iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn check(model_dir: &Path) {
    let name = model_dir.file_name().unwrap().to_string_lossy().to_string();
    let model = Model::load(model_dir, CpuBackend::new()).unwrap();
    let tokenizer = Tokenizer::from_dir(model_dir).unwrap();
    let stop = stop_tokens(model_dir, &tokenizer).unwrap();
    assert!(
        stop.contains(&2),
        "{name}: <|im_end|> (id 2) stops SmolLM2-Instruct: {stop:?}"
    );
    let prompts = prompts(model_dir);
    let options = GenerateOptions {
        max_new_tokens: NEW,
        sampling: Sampling::default(),
        stop: stop.clone(),
    };
    let mut singles = Vec::new();
    for prompt in &prompts {
        let generated = generate(&model, prompt, &options, |_| Ok(())).unwrap();
        let tokens = generated.sequences[0].new_ids.clone();
        let (want, margin) = greedy_by_full_passes(&model, prompt, &stop);
        assert_eq!(
            tokens, want,
            "{name}: greedy tokens through the cache differ from full passes"
        );
        eprintln!(
            "{name}: {:?} → {:?} (top-2 margin ≥ {margin:.3})",
            tokenizer.inner().decode(prompt, false).unwrap(),
            tokenizer.inner().decode(&tokens, false).unwrap()
        );
        singles.push(tokens);
    }
    // Every logit of the cached decode, against one full pass over prompt + tokens.
    let (prompt, tokens) = (&prompts[0], &singles[0]);
    let all: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    let rows: Vec<usize> = (prompt.len() - 1..all.len()).collect();
    let want = full_logits(&model, &all, &rows);
    let one = decode_vs_full(&model, prompt, tokens, &want);
    assert!(one < 1e-4, "{name}: cached logits differ by {one}");
    eprintln!("{name}: one rank, decode vs full pass ±{one:.1e}");
    for (tp, pp) in [(3, 1), (1, 2), (3, 2)] {
        let request = PlacementRequest {
            tp: Some(tp),
            pp: Some(pp),
            layers: None,
        };
        let group = RankGroup::load_cpu(model_dir, &request).unwrap();
        let diff = decode_vs_full(&group, prompt, tokens, &want);
        assert!(
            diff < 1e-4,
            "{name} tp {tp} × pp {pp}: cached logits differ by {diff}"
        );
        eprintln!("{name}: tp {tp} × pp {pp}, decode vs one rank's full pass ±{diff:.1e}");
    }
    // All prompts together (different lengths, each stopping on its own): each its own tokens.
    let together = generate_batch(&model, &prompts, &options, |_, _| Ok(())).unwrap();
    for (s, single) in together.sequences.iter().zip(&singles) {
        assert_eq!(&s.new_ids, single, "{name}: batched decoding changed a sequence");
    }
}

#[test]
fn smollm2_decodes_through_its_cache_like_full_passes() {
    let model = testkit::smollm2_f32();
    check(&model);
    let tmp = tempfile::tempdir().unwrap();
    let rtn = tmp.path().join("smollm2-rtn-g64");
    quantize(
        &model,
        &rtn,
        &QuantizeOptions::rtn(GroupSize::new(64).unwrap()),
        |_| {},
    )
    .unwrap();
    check(&rtn);
}

#[test]
fn seeded_sampling_repeats() {
    let model_dir = testkit::smollm2_f32();
    let model = Model::load(&model_dir, CpuBackend::new()).unwrap();
    let prompt = &prompts(&model_dir)[1];
    let sample = |seed: u64| {
        let options = GenerateOptions {
            max_new_tokens: 16,
            sampling: Sampling {
                temperature: 0.9,
                top_k: 50,
                top_p: 0.95,
                seed,
            },
            stop: Vec::new(),
        };
        generate(&model, prompt, &options, |_| Ok(())).unwrap().sequences[0]
            .new_ids
            .clone()
    };
    let first = sample(11);
    assert_eq!(first, sample(11), "the same seed must give the same tokens");
    assert_ne!(first, sample(12), "another seed should give other tokens");
}
