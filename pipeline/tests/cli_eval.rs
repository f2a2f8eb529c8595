//! The `awq` binary end to end: evaluation under the llama.cpp protocol with its JSON report,
//! and clean failures on bad input.

use std::process::Command;

fn awq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_awq"))
}

#[test]
fn llamacpp_protocol_report_matches_reference() {
    let model = testkit::smollm2_f32();
    let data = testkit::wiki_test();
    let reference = testkit::fixture("smollm2-135m/ppl_reference.json");
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("eval.json");
    let out = awq()
        .args(["eval", model.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args([
            "--ctx",
            "512",
            "--windows",
            "40",
            "--protocol",
            "llamacpp",
            "--batch",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = testkit::read_json(&json);
    let reference = testkit::read_json(&reference);
    let want = reference["transformers"]["ctx512_first40"]["llamacpp_second_half"]["ppl"]
        .as_f64()
        .unwrap();
    let ppl = report["ppl"].as_f64().unwrap();
    assert!(
        (ppl - want).abs() / want < 5e-4,
        "PPL {ppl} vs transformers {want}"
    );
    assert_eq!(report["predictions"], 10_200);
    assert_eq!(report["protocol"], "llamacpp");
    assert_eq!(report["windows"], 40);
    assert_eq!(report["windows_available"], 592);
    // SmolLM2's tokenizer adds no BOS, so llama-perplexity keeps each window's first token.
    assert!(report["bos"].is_null());
    assert_eq!(report["data"]["tokens"], 303_415);
    assert_eq!(report["data"]["file"]["sha256"], reference["data"]["sha256"]);
    // Every recorded digest is the file's own, computed here.
    let sha = |path: &std::path::Path| checkpoint::digest::sha256_file(path).unwrap();
    assert_eq!(report["data"]["file"]["sha256"], sha(&data).as_str());
    let files = report["model"]["files"].as_array().unwrap();
    for name in ["model.safetensors", "config.json", "tokenizer.json"] {
        let recorded = files
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} is not in the report"));
        assert_eq!(recorded["sha256"], sha(&model.join(name)).as_str(), "{name}");
        assert_eq!(
            recorded["bytes"],
            std::fs::metadata(model.join(name)).unwrap().len(),
            "{name}"
        );
    }
    assert_eq!(
        report["tokenizer"]["sha256"],
        sha(&model.join("tokenizer.json")).as_str()
    );
    let weights = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("model.safetensors"))
        .unwrap();
    for key in ["tokens_per_second", "eval_seconds", "wall_seconds"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(report["threads"].as_u64().unwrap() >= 1);
    assert_eq!(report["tool"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(!report["tool"]["git_commit"].as_str().unwrap().is_empty());
    // Weights are used in place from the mapped file: peak memory stays near its size.
    let model_bytes = weights["bytes"].as_f64().unwrap();
    let peak = report["peak_rss_bytes"].as_f64().unwrap();
    assert!(
        peak < 1.5 * model_bytes,
        "peak RSS {peak} for a {model_bytes}-byte model"
    );
}

#[test]
fn bad_model_folder_fails_cleanly() {
    let data = testkit::wiki_test();
    let tmp = tempfile::tempdir().unwrap();
    let out = awq()
        .args([
            "eval",
            tmp.path().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--ctx",
            "512",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("error:") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_gguf_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = awq()
        .args(["import-gguf", "/nonexistent/model.gguf", "--out"])
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn cuda_backend_fails_cleanly_without_enough_gpus() {
    let tiny = testkit::tiny_with_tokenizer("tiny-llama");
    let model = tiny.dir.clone();
    let data = model.join("text.txt");
    std::fs::write(&data, testkit::synthetic_text(50)).unwrap();
    // Without the `cuda` feature the build says so; with it and no GPU any tp fails; with
    // GPUs, more ranks than any machine has.
    #[cfg(not(feature = "cuda"))]
    let (tp, expected) = ("1", "this build has no CUDA support");
    #[cfg(feature = "cuda")]
    let (tp, expected) = match cuda_kernels::cuda_available() {
        Err(_) => ("1", "no CUDA driver found"),
        Ok(_) => ("4096", "GPUs"),
    };
    let out = awq()
        .arg("eval")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--ctx", "16", "--backend", "cuda", "--tp", tp])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--backend cuda") && stderr.contains(expected),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
