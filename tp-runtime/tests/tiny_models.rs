//! The tiny reference models reproduce transformers' logits and NLLs (the rope-scaled ones
//! at positions past their original context).

use std::path::Path;

use tp_runtime::backend::Prediction;
use tp_runtime::{CpuBackend, Model, SeqLayout};

struct Reference {
    input_ids: Vec<Vec<u32>>,
    last4_logits: Vec<Vec<Vec<f32>>>,
    mean_nll: Vec<f64>,
}

fn reference(dir: &Path) -> Reference {
    let r = testkit::read_json(&dir.join("reference.json"));
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let floats = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    Reference {
        input_ids: r["input_ids"].as_array().unwrap().iter().map(ids).collect(),
        last4_logits: r["last4_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|seq| seq.as_array().unwrap().iter().map(floats).collect())
            .collect(),
        mean_nll: r["mean_nll_per_sequence"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect(),
    }
}

/// Runs both reference sequences as one batch of two independent sequences.
fn check(name: &str) {
    let tiny = testkit::tiny(name);
    let dir = tiny.dir.clone();
    let r = reference(&dir);
    let model = Model::load(&dir, CpuBackend::new()).unwrap();
    let lengths: Vec<usize> = r.input_ids.iter().map(Vec::len).collect();
    let layout = SeqLayout::new(&lengths).unwrap();
    let ids: Vec<u32> = r.input_ids.concat();
    let hidden = model.forward(&ids, &layout).unwrap();

    let mut worst_logit = 0f32;
    let mut worst_nll = 0f64;
    let mut start = 0;
    for (s, seq) in r.input_ids.iter().enumerate() {
        let rows: Vec<usize> = (seq.len() - 4..seq.len()).map(|p| start + p).collect();
        let logits = model.logits(&hidden, &rows).unwrap();
        for (got, want) in logits.iter().zip(&r.last4_logits[s]) {
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                worst_logit = worst_logit.max((a - b).abs());
            }
        }
        let predictions: Vec<Prediction> = (0..seq.len() - 1)
            .map(|p| Prediction {
                row: start + p,
                target: seq[p + 1],
            })
            .collect();
        let nll = model.token_nll(&hidden, &predictions).unwrap();
        let mean = nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
        worst_nll = worst_nll.max((mean - r.mean_nll[s]).abs());
        assert!(
            (mean - r.mean_nll[s]).abs() < 1e-5,
            "{name} sequence {s}: mean NLL {mean} vs transformers {}",
            r.mean_nll[s]
        );
        start += seq.len();
    }
    assert!(worst_logit < 1e-4, "{name}: logits differ by up to {worst_logit}");
    eprintln!("{name}: max |Δlogit| = {worst_logit:.2e}, max |Δ mean NLL| = {worst_nll:.2e}");
}

#[test]
fn tiny_llama() {
    check("tiny-llama");
}

#[test]
fn tiny_llama_tied() {
    check("tiny-llama-tied");
}

#[test]
fn tiny_mistral() {
    check("tiny-mistral");
}

#[test]
fn tiny_qwen2() {
    check("tiny-qwen2");
}

#[test]
fn tiny_llama3_rope_scaling() {
    check("tiny-llama3");
}

#[test]
fn tiny_qwen2_yarn() {
    check("tiny-qwen2-yarn");
}

#[test]
fn tiny_qwen3_qk_norms() {
    check("tiny-qwen3");
}

#[test]
fn tiny_phi3_fused_and_partial_rotary() {
    check("tiny-phi3");
}

#[test]
fn tiny_gemma2_softcapping_and_alternating_windows() {
    check("tiny-gemma2");
}

#[test]
fn tiny_gemma3_local_rope_and_qk_norms() {
    check("tiny-gemma3");
}

#[test]
fn tiny_phi3_longrope_past_the_original_context() {
    check("tiny-phi3-longrope");
}
