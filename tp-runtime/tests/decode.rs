//! Decoding with a KV cache gives the logits of a full forward pass over the same tokens: the
//! tiny models (Llama, tied, Llama 3 and YaRN rope scaling, Mistral, Qwen2 with q/k/v biases),
//! and transformers' greedy continuations where the reference holds one; a sliding window shorter
//! than the sequence, several sequences decoded together (some sitting steps out), and the
//! model split over tensor-parallel ranks and pipeline stages.

use checkpoint::{Checkpoint, LayerType, ModelConfig};
use testkit::tiny::{TINY_MODELS, input_ids, tiny};
use tp_runtime::{CpuBackend, Decoder, Model, PlacementRequest, RankGroup, SeqLayout};

const LEN: usize = 48;
const PROMPT: usize = 20;

/// Logits of every position of `ids` from one forward pass.
fn full_logits(model: &Model<CpuBackend>, ids: &[u32]) -> Vec<Vec<f32>> {
    let hidden = model
        .forward(ids, &SeqLayout::single(ids.len()).unwrap())
        .unwrap();
    let rows: Vec<usize> = (0..ids.len()).collect();
    model.logits(&hidden, &rows).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Prefills `PROMPT` tokens, then decodes the rest one at a time, checking every position's
/// logits against `want`.
fn check_incremental(what: &str, decoder: &dyn Decoder, ids: &[u32], want: &[Vec<f32>]) -> f32 {
    decoder.start(1, 64).unwrap();
    let mut worst = 0f32;
    let first = decoder.extend(&[ids[..PROMPT].to_vec()]).unwrap();
    worst = worst.max(max_diff(first[0].as_ref().unwrap(), &want[PROMPT - 1]));
    for (i, &id) in ids.iter().enumerate().skip(PROMPT) {
        let got = decoder.extend(&[vec![id]]).unwrap();
        worst = worst.max(max_diff(got[0].as_ref().unwrap(), &want[i]));
    }
    assert!(
        worst < 1e-4,
        "{what}: decoded logits differ from the full pass by {worst}"
    );
    worst
}

#[test]
fn decode_equals_a_full_forward_on_every_tiny_model() {
    for name in TINY_MODELS {
        let t = tiny(name);
        let model = Model::load(&t.dir, CpuBackend::new()).unwrap();
        let vocab = model.config().vocab_size as u64;
        let ids = &input_ids(name, 1, LEN, vocab)[0];
        let want = full_logits(&model, ids);
        let worst = check_incremental(name, &model, ids, &want);
        eprintln!("{name}: decode vs full pass ±{worst:.1e}");
        // Past the cache's capacity is an error, not a wrap-around.
        model.start(1, PROMPT).unwrap();
        model.extend(&[ids[..PROMPT].to_vec()]).unwrap();
        let err = model.extend(&[vec![ids[PROMPT]]]).unwrap_err().to_string();
        assert!(err.contains("exceed the cache"), "{err}");
    }
}

#[test]
fn decode_slides_its_window_past_the_prompt() {
    let t = tiny("tiny-mistral");
    let mut config = ModelConfig::from_file(&t.dir.join("config.json")).unwrap();
    config.sliding_window = Some(7);
    config.layer_types = vec![LayerType::SlidingAttention; config.num_hidden_layers];
    let checkpoint = Checkpoint::open(&t.dir).unwrap();
    let model = Model::from_checkpoint(config, &checkpoint, CpuBackend::new()).unwrap();
    let ids = &input_ids("tiny-mistral", 1, LEN, 512)[0];
    let want = full_logits(&model, ids);
    check_incremental("tiny-mistral, window 7", &model, ids, &want);
    // The window matters: the same model without it predicts otherwise.
    let unwindowed = Model::load(&t.dir, CpuBackend::new()).unwrap();
    let other = full_logits(&unwindowed, ids);
    assert!(max_diff(&other[LEN - 1], &want[LEN - 1]) > 1e-2);
}

#[test]
fn sequences_decode_together_and_sit_steps_out() {
    let t = tiny("tiny-qwen2");
    let model = Model::load(&t.dir, CpuBackend::new()).unwrap();
    let seqs = input_ids("tiny-qwen2", 3, LEN, model.config().vocab_size as u64);
    let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| full_logits(&model, s)).collect();
    // Prompts of 5, 20 and 11 tokens, prefilled together.
    let prompts = [5, 20, 11];
    model.start(3, LEN).unwrap();
    let first = model
        .extend(&[0, 1, 2].map(|s| seqs[s][..prompts[s]].to_vec()))
        .unwrap();
    let mut worst = 0f32;
    for s in 0..3 {
        worst = worst.max(max_diff(first[s].as_ref().unwrap(), &want[s][prompts[s] - 1]));
    }
    let mut next = prompts;
    for step in 0..30 {
        // Sequence 1 sits every third step out.
        let tokens: Vec<Vec<u32>> = (0..3)
            .map(|s| match s == 1 && step % 3 == 0 {
                true => Vec::new(),
                false => vec![seqs[s][next[s]]],
            })
            .collect();
        let got = model.extend(&tokens).unwrap();
        for s in 0..3 {
            match tokens[s].is_empty() {
                true => assert!(got[s].is_none()),
                false => {
                    worst = worst.max(max_diff(got[s].as_ref().unwrap(), &want[s][next[s]]));
                    next[s] += 1;
                }
            }
        }
    }
    assert!(worst < 1e-4, "batched decode differs by {worst}");
}

#[test]
fn split_models_decode_like_one_rank() {
    let t = tiny("tiny-llama");
    let one = Model::load(&t.dir, CpuBackend::new()).unwrap();
    let ids = &input_ids("tiny-llama", 1, LEN, 512)[0];
    let want = full_logits(&one, ids);
    for (tp, pp) in [(2, 1), (1, 3), (2, 3)] {
        let request = PlacementRequest {
            tp: Some(tp),
            pp: Some(pp),
            layers: None,
        };
        let group = RankGroup::load_cpu(&t.dir, &request).unwrap();
        let worst = check_incremental(&format!("tp {tp} × pp {pp}"), &group, ids, &want);
        eprintln!("tiny-llama tp {tp} × pp {pp}: decode vs one rank's full pass ±{worst:.1e}");
    }
}

/// The ids of a JSON list.
fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_decoding_with_the_cache_matches_transformers() {
    let mut checked = Vec::new();
    for name in TINY_MODELS {
        let t = tiny(name);
        let reference = testkit::read_json(&t.dir.join("reference.json"));
        let Some(want) = reference.get("greedy_from_row0_first32").map(ids_of) else {
            continue;
        };
        let prompt = ids_of(&reference["input_ids"][0])[..32].to_vec();
        let model = Model::load(&t.dir, CpuBackend::new()).unwrap();
        model.start(1, prompt.len() + want.len()).unwrap();
        let mut logits = model.extend(&[prompt]).unwrap().remove(0).unwrap();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as u32;
            got.push(next);
            if got.len() < want.len() {
                logits = model.extend(&[vec![next]]).unwrap().remove(0).unwrap();
            }
        }
        assert_eq!(got, want, "{name}: greedy continuation");
        checked.push(name);
    }
    assert_eq!(
        checked,
        [
            "tiny-gemma2",
            "tiny-gemma3",
            "tiny-llama3",
            "tiny-phi3",
            "tiny-phi3-longrope",
            "tiny-qwen2-yarn",
            "tiny-qwen3"
        ]
    );
}

/// Gemma's sliding-window layers keep twice their window (64 rows of a 32-token window), not
/// the 256 positions of the cache: a 70-token prompt passes in chunks the stores take, and 60
/// decoding steps drop what the window left behind — with the logits of a full forward pass,
/// on one rank and split over tensor-parallel ranks and pipeline stages.
#[test]
fn sliding_window_layers_keep_only_their_window() {
    const LONG: usize = 130;
    const LONG_PROMPT: usize = 70;
    for name in ["tiny-gemma2", "tiny-gemma3"] {
        let t = tiny(name);
        let model = Model::load(&t.dir, CpuBackend::new()).unwrap();
        let ids = &input_ids(name, 1, LONG, model.config().vocab_size as u64)[0];
        let want = full_logits(&model, ids);
        let sliding = model
            .config()
            .layer_types
            .iter()
            .filter(|&&t| t == LayerType::SlidingAttention)
            .count();
        let decode = |decoder: &dyn Decoder, bytes: &dyn Fn() -> usize| {
            decoder.start(1, 256).unwrap();
            let kv_width = model.config().kv_features();
            assert_eq!(bytes(), 2 * (sliding * 64 + (3 - sliding) * 256) * kv_width * 4);
            let first = decoder.extend(&[ids[..LONG_PROMPT].to_vec()]).unwrap();
            let mut worst = max_diff(first[0].as_ref().unwrap(), &want[LONG_PROMPT - 1]);
            for (i, &id) in ids.iter().enumerate().skip(LONG_PROMPT) {
                let got = decoder.extend(&[vec![id]]).unwrap();
                worst = worst.max(max_diff(got[0].as_ref().unwrap(), &want[i]));
            }
            assert!(worst < 1e-4, "{name}: decoded logits differ by {worst}");
            worst
        };
        let worst = decode(&model, &|| model.cache_bytes());
        eprintln!("{name}: windowed cache, decode vs full pass ±{worst:.1e}");
        let request = PlacementRequest {
            tp: Some(2),
            pp: Some(3),
            layers: None,
        };
        let group = RankGroup::load_cpu(&t.dir, &request).unwrap();
        // Each of the 2 ranks of a stage holds half the kv heads: together, the same bytes.
        let worst = decode(&group, &|| group.ranks().iter().map(Model::cache_bytes).sum());
        eprintln!("{name}: tp 2 × pp 3, windowed cache ±{worst:.1e}");
    }
}

/// Several sequences through Gemma's windowed stores at once: prompts of 70 and 40 tokens
/// prefilled together in chunks while a third sits the call out, its 100-token prompt later
/// beside the others' decoding steps, then steps together — each with its own full pass's
/// logits.
#[test]
fn windowed_prefills_of_several_sequences_chunk_together() {
    let t = tiny("tiny-gemma3");
    let model = Model::load(&t.dir, CpuBackend::new()).unwrap();
    let seqs = input_ids("tiny-gemma3", 3, 120, model.config().vocab_size as u64);
    let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| full_logits(&model, s)).collect();
    model.start(3, 256).unwrap();
    let mut worst = 0f32;
    let mut check = |got: Vec<Option<Vec<f32>>>, at: [Option<usize>; 3]| {
        for (s, (got, at)) in got.iter().zip(at).enumerate() {
            match at {
                None => assert!(got.is_none()),
                Some(p) => worst = worst.max(max_diff(got.as_ref().unwrap(), &want[s][p])),
            }
        }
    };
    let got = model
        .extend(&[seqs[0][..70].to_vec(), vec![], seqs[2][..40].to_vec()])
        .unwrap();
    check(got, [Some(69), None, Some(39)]);
    let got = model
        .extend(&[vec![seqs[0][70]], seqs[1][..100].to_vec(), vec![seqs[2][40]]])
        .unwrap();
    check(got, [Some(70), Some(99), Some(40)]);
    for i in 0..15 {
        let got = model
            .extend(&[
                vec![seqs[0][71 + i]],
                vec![seqs[1][100 + i]],
                vec![seqs[2][41 + i]],
            ])
            .unwrap();
        check(got, [Some(71 + i), Some(100 + i), Some(41 + i)]);
    }
    assert!(worst < 1e-4, "several windowed sequences differ by {worst}");
}
