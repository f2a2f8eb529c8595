//! Broken checkpoints give errors that name the file and the tensor or key, never a panic.

use std::path::{Path, PathBuf};

use checkpoint::Checkpoint;
use safetensors::tensor::TensorView;
use tp_runtime::{CpuBackend, Model};

/// A copy of tiny-llama in a temporary folder.
fn copy_tiny() -> (testkit::TinyModel, PathBuf) {
    let tiny = testkit::tiny("tiny-llama");
    let dir = tiny.dir.clone();
    (tiny, dir)
}

/// Rewrites `dir/model.safetensors`, letting `edit` drop or replace tensors.
fn rewrite(dir: &Path, edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>) {
    let ck = Checkpoint::open(dir).unwrap();
    let kept: Vec<(String, Vec<usize>, Vec<u8>)> = ck
        .names()
        .into_iter()
        .filter_map(|n| {
            let t = ck.tensor(n).unwrap();
            edit(n, t.shape().to_vec(), t.bytes().to_vec()).map(|(s, b)| (n.to_string(), s, b))
        })
        .collect();
    drop(ck);
    let views: Vec<(String, TensorView<'_>)> = kept
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn load_error(dir: &Path) -> String {
    match Model::load(dir, CpuBackend::new()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_names_the_tensor() {
    let (_tiny, dir) = copy_tiny();
    rewrite(&dir, |n, s, b| {
        (n != "model.layers.1.mlp.up_proj.weight").then_some((s, b))
    });
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains(&dir.display().to_string()), "{err}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let (_tiny, dir) = copy_tiny();
    rewrite(&dir, |n, s, b| {
        if n == "model.layers.0.self_attn.k_proj.weight" {
            // [64, 256] stored as [128, 128]: same bytes, wrong shape.
            Some((vec![128, 128], b))
        } else {
            Some((s, b))
        }
    });
    let err = load_error(&dir);
    assert!(err.contains("model.layers.0.self_attn.k_proj.weight"), "{err}");
    assert!(err.contains("[128, 128]") && err.contains("[64, 256]"), "{err}");
}

#[test]
fn a_fused_qkv_proj_of_the_wrong_rows_names_the_tensor() {
    let tiny = testkit::tiny("tiny-phi3");
    let dir = tiny.dir.clone();
    rewrite(&dir, |n, s, b| {
        if n == "model.layers.2.self_attn.qkv_proj.weight" {
            // [384, 256] (q 256 + k 64 + v 64) stored as [192, 512]: same bytes, wrong rows.
            Some((vec![192, 512], b))
        } else {
            Some((s, b))
        }
    });
    let err = load_error(&dir);
    assert!(err.contains("model.layers.2.self_attn.qkv_proj.weight"), "{err}");
    assert!(err.contains("[192, 512]") && err.contains("[384, 256]"), "{err}");
}

#[test]
fn config_problems_name_file_and_key() {
    let (_tiny, dir) = copy_tiny();
    let path = dir.join("config.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
    config.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("config.json") && err.contains("intermediate_size"),
        "{err}"
    );

    std::fs::write(&path, original.replace("LlamaForCausalLM", "FalconForCausalLM")).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("unsupported architecture `FalconForCausalLM`"),
        "{err}"
    );

    std::fs::write(&path, "{ not json").unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("config.json") && err.contains("invalid JSON"),
        "{err}"
    );
}

#[test]
fn truncated_and_oversized_headers_name_the_file() {
    let (_tiny, dir) = copy_tiny();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(bytes.len() as u64 * 2).to_le_bytes());
    std::fs::write(&path, &huge).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("header"),
        "{err}"
    );

    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("header too small"), "{err}");
}
