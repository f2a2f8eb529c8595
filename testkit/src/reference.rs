//! Direct f64 implementations of kernels, every intermediate materialised: what the CPU
//! kernels and the CUDA kernels (on a GPU or emulated) are compared with.

/// The heads of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys at least this many positions back are masked.
    pub window: Option<usize>,
    pub scale: f32,
    /// Scores pass through `cap · tanh(score / cap)` (Gemma 2).
    pub softcap: Option<f32>,
}

/// Causal grouped-query attention: query row `r` (of `q`, `[rows, heads·d]`) sits at position
/// `pos[r]` of a sequence whose position 0 is row `key_base[r]` of the key store `k`, `v`
/// (`[key rows, kv_heads·d]`); it sees the positions `p ≤ pos[r]` with `pos[r] − p < window`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], h: Heads, key_base: &[u32], pos: &[u32]) -> Vec<f64> {
    let d = h.head_dim;
    let (q_cols, kv_cols) = (h.heads * d, h.kv_heads * d);
    let group = h.heads / h.kv_heads;
    let window = h.window.unwrap_or(usize::MAX);
    let mut out = vec![0f64; q.len()];
    for (r, (&base, &position)) in key_base.iter().zip(pos).enumerate() {
        let (base, position) = (base as usize, position as usize);
        let keys: Vec<usize> = (0..=position)
            .filter(|&p| position - p < window)
            .map(|p| base + p)
            .collect();
        for head in 0..h.heads {
            let g = head / group;
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    (0..d)
                        .map(|c| q[r * q_cols + head * d + c] as f64 * k[j * kv_cols + g * d + c] as f64)
                        .sum::<f64>()
                        * h.scale as f64
                })
                .map(|s| match h.softcap {
                    Some(cap) => cap as f64 * (s / cap as f64).tanh(),
                    None => s,
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                out[r * q_cols + head * d + c] = keys
                    .iter()
                    .zip(&e)
                    .map(|(&j, w)| w / sum * v[j * kv_cols + g * d + c] as f64)
                    .sum();
            }
        }
    }
    out
}
