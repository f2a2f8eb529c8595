//! `awq inspect`: what a checkpoint folder holds, and whether an AWQ one is well-formed —
//! also one written by another tool. Reads only headers and configuration, never weights.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use checkpoint::names::{Projection, required_tensors};
use checkpoint::{AwqShape, Checkpoint, Dtype, ModelConfig};
use clap::Args;

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
    if let Some(q) = &config.quantization {
        for layer in 0..config.num_hidden_layers {
            for p in Projection::ALL
                .into_iter()
                .filter(|p| p.is_quantized(config, layer))
            {
                let (out_features, in_features) = p.shape(config);
                let shape = AwqShape {
                    in_features,
                    out_features,
                    group_size: q.group_size,
                };
                let prefix = p.stored_prefix(config, layer);
                if let Err(e) = shape.check(&format!("`{prefix}`")) {
                    problems.push(e.to_string());
                }
                let dense = format!("{prefix}.weight");
                if ck.contains(&dense) {
                    problems.push(format!("`{dense}` should not exist beside its qweight"));
                }
            }
        }
        if !problems.is_empty() {
            return problems;
        }
    }
    let float = ["F32", "F16", "BF16"];
    for t in required_tensors(config) {
        let dtypes: &[&str] = match t.dtype {
            Some(Dtype::I32) => &["I32"],
            _ => &float,
        };
        expect(ck, &mut problems, t.name, dtypes, t.shape);
    }
    problems
}

/// Runs `awq inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let config = ModelConfig::from_file(&args.dir.join("config.json"))?;
    let ck = Checkpoint::open(&args.dir)?;
    let c = &config;
    println!("{}", args.dir.display());
    println!("  {}", super::model_summary(c));
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
