//! The placement planner on the shapes of public models (`fixtures/configs/`), each as AWQ
//! g128 (g64 for SmolLM2, whose 576 features are not whole groups of 128), on the device
//! sets people have, at ctx 4096 and batch 8: weight bytes against a hand count, and the
//! decisions that must hold.

use checkpoint::{ModelConfig, QuantizationConfig};
use tp_runtime::planner::{GIB, PlanDecision, PlanRequest, plan};
use tp_runtime::{Placement, ShardPlan, StagePlan};

const MODELS: [&str; 18] = [
    "gemma-2-9b",
    "gemma-3-1b",
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-3-8b",
    "llama-3.1-8b",
    "llama-3.2-1b",
    "llama-3.3-70b",
    "mistral-7b",
    "phi-3-mini-4k",
    "phi-4-mini",
    "qwen2-7b",
    "qwen2-72b",
    "qwen2.5-7b",
    "qwen3-8b",
    "qwen3-32b",
    "smollm2-135m",
];

const DEVICE_SETS: [(usize, u64); 5] = [(1, 80), (2, 24), (4, 24), (8, 16), (3, 24)];

fn awq(name: &str) -> ModelConfig {
    let path = testkit::fixture(&format!("configs/{name}.json"));
    let mut config = ModelConfig::from_file(&path).unwrap();
    config.quantization = Some(QuantizationConfig {
        group_size: if name == "smollm2-135m" { 64 } else { 128 },
        modules_to_not_convert: Vec::new(),
    });
    config.torch_dtype = Some("float16".into());
    config
}

fn decide(config: &ModelConfig, devices: usize, gib: u64) -> tp_runtime::Result<PlanDecision> {
    plan(config, &PlanRequest::new(config, devices, gib * GIB, 4096, 8))
}

/// The whole model's bytes counted by hand: per linear `[n, k]`, `k·n/2` of int4 codes,
/// `k/g · n/8 · 4` of zeros and `k/g · n · 2` of f16 scales; f16 norms, embeddings and lm_head.
fn hand_count(c: &ModelConfig) -> u64 {
    let g = c.quantization.as_ref().unwrap().group_size as u64;
    let (h, i, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (q, kv) = (c.q_features() as u64, c.kv_features() as u64);
    let linear = |n: u64, k: u64| k * n / 2 + k / g * n / 8 * 4 + k / g * n * 2;
    let mut layer = linear(q, h) + 2 * linear(kv, h) + linear(h, q) + 2 * linear(i, h) + linear(h, i);
    if c.qkv_bias {
        layer += 2 * (q + 2 * kv);
    }
    // Two norms a layer, four with Gemma's sandwich norms.
    layer += 2 * if c.sandwich_norms { 4 } else { 2 } * h;
    if c.qk_norm {
        layer += 2 * 2 * c.head_dim as u64;
    }
    let tables = if c.tie_word_embeddings { 1 } else { 2 } * v * h * 2;
    c.num_hidden_layers as u64 * layer + tables + 2 * h
}

#[test]
fn weight_bytes_match_a_hand_count() {
    for name in MODELS {
        let c = awq(name);
        let whole = Placement::single(&c)
            .rank(0)
            .weight_bytes(&c, checkpoint::Dtype::F16);
        assert_eq!(whole, hand_count(&c), "{name}");
        // Split any way, the stages hold every layer once (norms and vocabulary aside).
        let split = Placement::new(&c, 1, StagePlan::even(c.num_hidden_layers, 4).unwrap()).unwrap();
        let sum: u64 = split
            .ranks()
            .iter()
            .map(|r| r.weight_bytes(&c, checkpoint::Dtype::F16))
            .sum();
        let extra = if c.tie_word_embeddings {
            (c.vocab_size * c.hidden_size * 2) as u64
        } else {
            0
        };
        assert_eq!(sum, whole + extra, "{name}: pp 4");
    }
}

#[test]
fn every_model_on_every_device_set() {
    for name in MODELS {
        let c = awq(name);
        for (devices, gib) in DEVICE_SETS {
            match decide(&c, devices, gib) {
                Ok(d) => {
                    let chosen = &d.chosen;
                    assert_eq!(chosen.tp * chosen.pp, devices, "{name} on {devices}");
                    assert!(chosen.devices.iter().all(|m| m.free >= 0), "{name} on {devices}");
                    assert_eq!(chosen.layers.iter().sum::<usize>(), c.num_hidden_layers);
                    eprintln!(
                        "{name:>13} on {devices} × {gib:>2} GiB: tp {} × pp {}, layers {:?}, peak {:.1} GiB",
                        chosen.tp,
                        chosen.pp,
                        chosen.layers,
                        chosen.peak() as f64 / GIB as f64
                    );
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("smallest device memory that would hold it"),
                        "{name}: {e}"
                    );
                    eprintln!("{name:>13} on {devices} × {gib:>2} GiB: {e:.120}");
                }
            }
        }
    }
}

#[test]
fn decisions_that_must_hold() {
    // SmolLM2 on two devices: 9 heads rule out tp = 2, so the stages split.
    let smol = awq("smollm2-135m");
    let d = decide(&smol, 2, 24).unwrap();
    assert_eq!((d.chosen.tp, d.chosen.pp), (1, 2));
    let tp2 = d.rejected.iter().find(|c| c.tp == 2).unwrap();
    assert!(
        tp2.rejected
            .as_ref()
            .unwrap()
            .contains("9 attention heads are not divisible by 2"),
        "{tp2:?}"
    );
    // Llama-2-7B on three devices never gets tp = 3 (32 heads).
    let llama7 = awq("llama-2-7b");
    let d = decide(&llama7, 3, 24).unwrap();
    assert_ne!(d.chosen.tp, 3);
    assert_eq!((d.chosen.tp, d.chosen.pp), (1, 3));
    // Qwen2-72B at tp = 4 pads its 231 groups of 128 to 232.
    let qwen72 = awq("qwen2-72b");
    let shards = ShardPlan::new(&qwen72, 4).unwrap();
    assert_eq!(shards.intermediate, 231 * 128);
    assert_eq!(shards.intermediate_padded, 232 * 128);
    // Llama-2-70B in AWQ is about 36 GB: not one 24 GiB device; two devices of it do.
    let llama70 = awq("llama-2-70b");
    let err = decide(&llama70, 1, 24).unwrap_err().to_string();
    assert!(
        err.contains("the smallest device memory that would hold it is"),
        "{err}"
    );
    let needed: f64 = err
        .split("would hold it is ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap();
    assert!(needed > 24.0, "{needed}");
    // That much memory does hold it.
    assert!(decide(&llama70, 1, needed.ceil() as u64).is_ok());
    // Forcing a strategy that cannot fit names the shortfall.
    let mut request = PlanRequest::new(&llama70, 2, 24 * GIB, 4096, 8);
    request.strategy = tp_runtime::planner::Strategy::Tp;
    request.ctx = 32768;
    let err = plan(&llama70, &request).unwrap_err().to_string();
    assert!(
        err.contains("does not fit: needs") && err.contains("more per device"),
        "{err}"
    );
}

/// Gemma's sliding-window layers keep twice their window in the cache, as the runtime's
/// cache does (`KvCache`): Gemma-3-1B's 22 sliding layers (of 26) keep 1024 of 4096 positions,
/// Gemma-2-9B's 21 (of 42) keep all 4096 of them (a window of 4096).
#[test]
fn sliding_window_layers_keep_their_window_in_the_memory_model() {
    let memory = |c: &ModelConfig| {
        let request = PlanRequest::new(c, 1, 80 * GIB, 4096, 8);
        tp_runtime::planner::device_memory(c, &Placement::single(c), &request)[0].kv_cache
    };
    let gemma3 = awq("gemma-3-1b");
    assert_eq!(memory(&gemma3), 2 * 256 * (22 * 1024 + 4 * 4096) * 8 * 2);
    let gemma2 = awq("gemma-2-9b");
    assert_eq!(memory(&gemma2), 2 * 2048 * 42 * 4096 * 8 * 2);
}

#[test]
fn several_nodes_keep_tensor_parallelism_inside_one() {
    let c = awq("llama-2-70b");
    let mut request = PlanRequest::new(&c, 8, 16 * GIB, 4096, 1);
    request.nodes = 4;
    let d = plan(&c, &request).unwrap();
    assert!(d.chosen.tp <= 2, "{:?}", d.chosen);
    let tp8 = d.rejected.iter().find(|c| c.tp == 8).unwrap();
    assert!(
        tp8.rejected.as_ref().unwrap().contains("would cross nodes"),
        "{tp8:?}"
    );
}
