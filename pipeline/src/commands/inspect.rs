//! `awq inspect`: what a checkpoint folder holds, and whether an AWQ one is well-formed —
//! also one written by another tool. Reads only headers and configuration, never weights.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use tp_runtime::awq::PACK;
use tp_runtime::model::{Projection, layer_tensor_name};
use tp_runtime::{Checkpoint, ModelConfig};

/// Arguments of `awq inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face or AWQ checkpoint folder.
    pub dir: PathBuf,
}

/// Records a problem unless tensor `name` exists with one of `dtypes` and `shape`.
fn expect(ck: &Checkpoint, problems: &mut Vec<String>, name: String, dtypes: &[&str], shape: Vec<usize>) {
    match ck.tensor(&name) {
        Err(_) => problems.push(format!("`{name}` is missing")),
        Ok(t) => {
            let dtype = format!("{:?}", t.dtype());
            if !dtypes.contains(&dtype.as_str()) {
                problems.push(format!("`{name}` is {dtype}, expected {}", dtypes.join(" or ")));
            }
            if t.shape() != shape.as_slice() {
                problems.push(format!("`{name}` has shape {:?}, expected {shape:?}", t.shape()));
            }
        }
    }
}

/// Every problem of the checkpoint's tensors against its configuration.
pub fn format_problems(config: &ModelConfig, ck: &Checkpoint) -> Vec<String> {
    let mut problems = Vec::new();
    let p = &mut problems;
    let float = ["F32", "F16", "BF16"];
    let (v, h) = (config.vocab_size, config.hidden_size);
    expect(ck, p, "model.embed_tokens.weight".into(), &float, vec![v, h]);
    expect(ck, p, "model.norm.weight".into(), &float, vec![h]);
    if !config.tie_word_embeddings {
        expect(ck, p, "lm_head.weight".into(), &float, vec![v, h]);
    }
    for layer in 0..config.num_hidden_layers {
        for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            expect(ck, p, layer_tensor_name(layer, norm), &float, vec![h]);
        }
        for proj in Projection::ALL {
            let prefix = proj.prefix(layer);
            let (n, k) = proj.shape(config);
            match &config.quantization {
                Some(q) if q.converts(&prefix) => {
                    let g = q.group_size;
                    if k % g != 0 || n % PACK != 0 {
                        p.push(format!(
                            "`{prefix}` [{n}, {k}] cannot hold groups of {g} packed 8 per word"
                        ));
                        continue;
                    }
                    expect(ck, p, format!("{prefix}.qweight"), &["I32"], vec![k, n / PACK]);
                    expect(ck, p, format!("{prefix}.qzeros"), &["I32"], vec![k / g, n / PACK]);
                    expect(ck, p, format!("{prefix}.scales"), &float, vec![k / g, n]);
                    if ck.contains(&format!("{prefix}.weight")) {
                        p.push(format!("`{prefix}.weight` should not exist beside its qweight"));
                    }
                }
                _ => expect(ck, p, format!("{prefix}.weight"), &float, vec![n, k]),
            }
            if proj.has_bias(config) {
                expect(ck, p, format!("{prefix}.bias"), &float, vec![n]);
            }
        }
    }
    problems
}

/// Runs `awq inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let config = ModelConfig::from_file(&args.dir.join("config.json"))?;
    let ck = Checkpoint::open(&args.dir)?;
    let c = &config;
    println!("{}", args.dir.display());
    println!(
        "  {}: {} layers, hidden {}, intermediate {}, heads {} (kv {}), head_dim {}, vocab {}, rope theta {}, {} lm_head",
        c.architecture.hf_name(),
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        c.rope_theta,
        if c.tie_word_embeddings { "tied" } else { "untied" }
    );
    match &c.quantization {
        Some(q) => println!("  quantization: {}", q.to_json()),
        None => println!("  quantization: none"),
    }
    let mut by_dtype: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for name in ck.names() {
        let t = ck.tensor(name)?;
        let e = by_dtype.entry(format!("{:?}", t.dtype())).or_default();
        e.0 += 1;
        e.1 += t.bytes().len() as u64;
    }
    let files: Vec<String> = ck.files().map(|p| p.display().to_string()).collect();
    println!("  files: {}", files.join(", "));
    for (dtype, (count, bytes)) in &by_dtype {
        println!("  {dtype}: {count} tensors, {:.1} MB", *bytes as f64 / 1e6);
    }
    let problems = format_problems(&config, &ck);
    if problems.is_empty() {
        println!(
            "  format: ok ({} tensors as the configuration expects)",
            ck.names().len()
        );
        Ok(())
    } else {
        for p in &problems {
            println!("  problem: {p}");
        }
        bail!("{}: {} format problems", args.dir.display(), problems.len())
    }
}
