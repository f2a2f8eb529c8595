//! SmolLM2-135M imported from its GGUF agrees with the transformers reference: tokenizer,
//! configuration, window-0 NLL and top-5, and the 40-window perplexity.

use std::path::PathBuf;

use checkpoint::{ModelConfig, Tokenizer};
use evaluation::perplexity::{Protocol, WindowPlan, evaluate};
use tp_runtime::backend::Prediction;
use tp_runtime::{CpuBackend, Model, SeqLayout};

struct Fixture {
    model: PathBuf,
    reference: PathBuf,
    text: String,
}

fn fixture() -> Fixture {
    Fixture {
        model: testkit::smollm2_f32(),
        reference: testkit::fixture("smollm2-135m"),
        text: std::fs::read_to_string(testkit::wiki_test()).unwrap(),
    }
}

fn reference_value(f: &Fixture, pointer: &str) -> serde_json::Value {
    testkit::read_json(&f.reference.join("ppl_reference.json"))
        .pointer(pointer)
        .unwrap_or_else(|| panic!("ppl_reference.json has no {pointer}"))
        .clone()
}

/// Our tokenizer (built from the GGUF vocabulary) gives the reference tokenizer's ids on the
/// whole of wiki.test.raw: the first 1000 ids one by one, then every 10,000-token chunk and
/// the whole sequence by SHA-256 (`fixtures/smollm2-135m/wiki_test_ids.json`).
#[test]
fn tokenizer_matches_reference_on_the_whole_file() {
    let f = fixture();
    let ours = Tokenizer::from_dir(&f.model)
        .unwrap()
        .encode(&f.text, false)
        .unwrap();
    let first: Vec<u32> = serde_json::from_value(
        testkit::read_json(&f.reference.join("wiki_test_first1000_ids.json"))["ids"].clone(),
    )
    .expect("a list of ids");
    assert_eq!(&ours[..1000], first.as_slice());
    let reference = testkit::read_json(&f.reference.join("wiki_test_ids.json"));
    assert_eq!(ours.len() as u64, reference["n_tokens"].as_u64().unwrap());
    let chunk = reference["chunk_tokens"].as_u64().unwrap() as usize;
    let chunks = reference["chunk_sha256_u32_le"].as_array().unwrap();
    assert_eq!(chunks.len(), ours.len().div_ceil(chunk));
    for (i, (ids, want)) in ours.chunks(chunk).zip(chunks).enumerate() {
        assert_eq!(
            testkit::sha256_u32_le(ids),
            want.as_str().unwrap(),
            "tokens {}..{} differ from the reference tokenizer's",
            i * chunk,
            i * chunk + ids.len()
        );
    }
    assert_eq!(
        testkit::sha256_u32_le(&ours),
        reference["sha256_u32_le"].as_str().unwrap()
    );
}

#[test]
fn imported_config_matches_reference() {
    let f = fixture();
    let ours = ModelConfig::from_file(&f.model.join("config.json")).unwrap();
    let theirs = ModelConfig::from_file(&f.reference.join("config.json")).unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn window0_nll_and_top5_match_reference() {
    let f = fixture();
    let tokens = Tokenizer::from_dir(&f.model)
        .unwrap()
        .encode(&f.text, false)
        .unwrap();
    let model = Model::load(&f.model, CpuBackend::new()).unwrap();
    let window = &tokens[..512];
    let hidden = model.forward(window, &SeqLayout::single(512).unwrap()).unwrap();
    let predictions: Vec<Prediction> = (0..511)
        .map(|row| Prediction {
            row,
            target: window[row + 1],
        })
        .collect();
    let nll = model.token_nll(&hidden, &predictions).unwrap();
    let mean = nll.iter().map(|&v| v as f64).sum::<f64>() / 511.0;
    let want = reference_value(&f, "/transformers/window0_ctx512/mean_nll")
        .as_f64()
        .unwrap();
    assert!((mean - want).abs() < 1e-4, "window 0 mean NLL {mean} vs {want}");

    let logits = model.logits(&hidden, &[511]).unwrap().remove(0);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top5: Vec<u64> = order[..5].iter().map(|&i| i as u64).collect();
    assert_eq!(top5, vec![476, 18, 637, 3297, 281]);
    let want_logits = reference_value(&f, "/transformers/window0_ctx512/last_position_topk_logits");
    for (i, want) in order[..5].iter().zip(want_logits.as_array().unwrap()) {
        assert!((logits[*i] as f64 - want.as_f64().unwrap()).abs() < 1e-3);
    }
}

#[test]
fn forty_window_perplexity_matches_reference() {
    let f = fixture();
    let tokens = Tokenizer::from_dir(&f.model)
        .unwrap()
        .encode(&f.text, false)
        .unwrap();
    let model = Model::load(&f.model, CpuBackend::new()).unwrap();
    let plan = WindowPlan::new(tokens.len(), 512, Some(40), Protocol::Full, None).unwrap();
    let result = evaluate(&model, &tokens, &plan, 1, |_, _| {}).unwrap();
    assert_eq!(result.predictions, 20_440);
    let want = reference_value(&f, "/transformers/ctx512_first40/full_window/ppl")
        .as_f64()
        .unwrap();
    let rel = (result.ppl - want).abs() / want;
    assert!(
        rel < 5e-4,
        "PPL {} vs transformers {want} ({rel:.2e} relative)",
        result.ppl
    );
    // Every window, not only the total, tracks the reference.
    let per_window = reference_value(&f, "/transformers/per_window_mean_nll_ctx512");
    for (w, want) in result.windows.iter().zip(per_window.as_array().unwrap()) {
        let want = want.as_f64().unwrap();
        assert!(
            (w.mean_nll() - want).abs() < 1e-4,
            "window {}: {} vs {want}",
            w.index,
            w.mean_nll()
        );
    }
    eprintln!(
        "PPL {:.4} (reference {want:.4}), {:.0} tokens/s",
        result.ppl, result.tokens_per_second
    );
}
