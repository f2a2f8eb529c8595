//! AWQ checkpoints read back independently of the packer, for tests.

use std::path::Path;

use checkpoint::writer::{CheckpointStream, TensorSpec};
use checkpoint::{Checkpoint, Dtype};

/// Unpacks one "gemm" linear into a dense `[out, in]` f32 weight, written from awq-format.md §5
/// alone (not from the packer): `qweight` is `[in, out/8]` int32, nibble `i` of word
/// `(k, c)` holds output `8c + [0, 2, 4, 6, 1, 3, 5, 7][i]`; `qzeros` is `[in/g, out/8]`
/// packed the same way; `scales` is `[in/g, out]`; `W[n, k] = (q − z) · s`.
pub fn unpack_gemm(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    in_f: usize,
    out_f: usize,
    g: usize,
) -> Vec<f32> {
    const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
    let cols = out_f / 8;
    let unpack = |words: &[i32], rows: usize| -> Vec<u8> {
        let mut out = vec![0u8; rows * out_f];
        for r in 0..rows {
            for c in 0..cols {
                let word = words[r * cols + c] as u32;
                for (i, &o) in ORDER.iter().enumerate() {
                    out[r * out_f + 8 * c + o] = ((word >> (4 * i)) & 15) as u8;
                }
            }
        }
        out
    };
    let q = unpack(qweight, in_f);
    let z = unpack(qzeros, in_f / g);
    let mut w = vec![0f32; out_f * in_f];
    for k in 0..in_f {
        for n in 0..out_f {
            let j = (k / g) * out_f + n;
            w[n * in_f + k] = (q[k * out_f + n] as f32 - z[j] as f32) * scales[j];
        }
    }
    w
}

/// Rewrites an AWQ checkpoint folder as a dense f32 one (same config without
/// `quantization_config`), unpacking every linear with [`unpack_gemm`], one tensor at a time.
pub fn dequantize_checkpoint(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let mut config = crate::read_json(&src.join("config.json"));
    let g = config["quantization_config"]["group_size"].as_u64().unwrap() as usize;
    config.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dst.join("tokenizer.json")).unwrap();
    let ck = Checkpoint::open(src).unwrap();
    // Dense names and shapes first (the file's header), then each tensor's values.
    let dense: Vec<(String, Option<&str>, Vec<usize>)> = ck
        .names()
        .into_iter()
        .filter(|n| !n.ends_with(".qzeros") && !n.ends_with(".scales"))
        .map(|name| {
            let shape = ck.tensor(name).unwrap().shape().to_vec();
            match name.strip_suffix(".qweight") {
                Some(prefix) => (
                    format!("{prefix}.weight"),
                    Some(prefix),
                    vec![shape[1] * 8, shape[0]],
                ),
                None => (name.to_string(), None, shape),
            }
        })
        .collect();
    let specs = dense
        .iter()
        .map(|(name, _, shape)| TensorSpec::new(name.clone(), Dtype::F32, shape))
        .collect();
    let mut out = CheckpointStream::create(dst, specs, u64::MAX, Default::default()).unwrap();
    for (name, prefix, shape) in &dense {
        let values = match prefix {
            Some(prefix) => {
                let qweight = ck.tensor(&format!("{prefix}.qweight")).unwrap().to_i32().unwrap();
                let qzeros = ck.tensor(&format!("{prefix}.qzeros")).unwrap().to_i32().unwrap();
                let scales = ck.tensor(&format!("{prefix}.scales")).unwrap().to_f32().unwrap();
                unpack_gemm(&qweight, &qzeros, &scales, shape[1], shape[0], g)
            }
            None => ck.tensor(name).unwrap().to_f32().unwrap().into_vec(),
        };
        out.write(name, bytemuck::cast_slice(&values)).unwrap();
    }
    out.finish().unwrap();
}

/// SHA-256 of every file under a folder (recursively), by relative path.
pub fn folder_digest(dir: &Path) -> Vec<(String, String)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for p in paths {
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let name = p.strip_prefix(base).unwrap().display().to_string();
                out.push((name, checkpoint::digest::sha256_file(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}
