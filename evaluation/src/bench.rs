//! The arithmetic of a forward pass, the yardstick `awq bench eval` and `awq bench scale`
//! hold evaluation throughput against: FLOPs per token, and the tokens/s they allow at a
//! measured GEMM rate (a roofline).

use checkpoint::ModelConfig;

/// FLOPs per token of a forward pass at context `ctx` (multiply-add = 2): every linear layer
/// and the lm_head, then attention's scores and weighted values, `2 · q_features` FLOPs each
/// per visible key, with on average `(ctx + 1) / 2` keys visible.
pub fn flops_per_token(c: &ModelConfig, ctx: usize) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let (q, kv) = (c.q_features() as f64, c.kv_features() as f64);
    let layer_params = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let linear = 2.0 * (layer_params * c.num_hidden_layers as f64 + c.vocab_size as f64 * h);
    let attention = 2.0 * 2.0 * q * (ctx as f64 + 1.0) / 2.0 * c.num_hidden_layers as f64;
    linear + attention
}

/// Tokens/s if every FLOP of a token ran at `gflops` GFLOP/s.
pub fn roofline_tokens_per_second(gflops: f64, flops_per_token: f64) -> f64 {
    gflops * 1e9 / flops_per_token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> ModelConfig {
        ModelConfig::from_json(&json, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn a_tiny_model_counts_by_hand() {
        // hidden 8, 2 heads of 4 (q 8), 1 kv head (kv 4), intermediate 16, 2 layers, vocab 10.
        let c = config(
            serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,
            "num_key_value_heads":1,"rms_norm_eps":1e-5,"vocab_size":10}),
        );
        // Per layer q 8·8 + k, v 2·8·4 + o 8·8 + MLP 3·8·16 = 576 weights; 2 layers and the
        // 10 × 8 head: 2 · 1232 = 2464. Attention at ctx 3: 2 · 2 · 8 · 2 keys · 2 layers.
        assert_eq!(flops_per_token(&c, 3), 2464.0 + 128.0);
        assert_eq!(flops_per_token(&c, 0), 2464.0 + 32.0);
        assert_eq!(roofline_tokens_per_second(2.0, 1e9), 2.0);
    }

    #[test]
    fn smollm2_flops_match_hand_count() {
        let c = config(
            serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
            "num_key_value_heads":3,"rms_norm_eps":1e-5,"vocab_size":49152,"tie_word_embeddings":true}),
        );
        // 2 × 134.5 M parameters in linear layers and lm_head (≈ 0.27 GFLOP per token).
        let linear = flops_per_token(&c, 0) - 2.0 * 2.0 * 576.0 * 0.5 * 30.0;
        assert!((linear / 1e9 - 0.269).abs() < 0.002, "{linear}");
    }
}
