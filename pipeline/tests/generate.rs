//! `awq generate`, `awq eval --kl-base` and a job's `kl` evaluation from the command line.

mod common;

use common::{awq, s, text};

#[test]
fn chat_generation_streams_and_reports() {
    let model = testkit::smollm2_f32();
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("gen.json");
    let o = awq(&[
        "generate",
        s(&model),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "12",
        "--json",
        s(&json),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r = testkit::read_json(&json);
    let out = String::from_utf8_lossy(&o.stdout);
    // What was streamed is the report's text (and a final newline).
    assert_eq!(
        out.trim_end(),
        r["text"].as_str().unwrap().trim_end(),
        "{}",
        text(&o)
    );
    assert!(r["text"].as_str().unwrap().contains("Paris"), "{r}");
    assert!(
        r["rendered_prompt"]
            .as_str()
            .unwrap()
            .starts_with("<|im_start|>system")
    );
    assert_eq!(r["kind"], "generation");
    let new = r["new_ids"].as_array().unwrap();
    assert!(!new.is_empty() && new.len() <= 12);
    if r["stop"] == "stop" {
        assert_eq!(new.last().unwrap(), 2, "a stop ends on <|im_end|>");
    }
    assert!(r["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    // Seeded sampling: the same seed, the same ids.
    let sampled = |seed: &str| {
        let json = tmp.path().join(format!("s{seed}.json"));
        let o = awq(&[
            "generate",
            s(&model),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
            s(&json),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        testkit::read_json(&json)["new_ids"].clone()
    };
    assert_eq!(sampled("3"), sampled("3"));
}

#[test]
fn bad_generation_requests_fail_clearly() {
    let t = testkit::tiny_with_tokenizer("tiny-llama");
    let o = awq(&["generate", s(&t.dir)]);
    assert!(
        !o.status.success() && text(&o).contains("--prompt"),
        "{}",
        text(&o)
    );
    // A checkpoint without a chat template says so, naming the file.
    let o = awq(&["generate", s(&t.dir), "--chat", "--prompt", "hi"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("chat_template"), "{}", text(&o));
    let o = awq(&["generate", s(&t.dir), "--prompt", "hi", "--temperature=-1"]);
    assert!(
        !o.status.success() && text(&o).contains("temperature"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("panicked"));
}

#[test]
fn kl_against_the_original_from_eval_and_from_a_job() {
    let t = testkit::tiny_with_tokenizer("tiny-llama");
    let root = t.root();
    std::fs::write(root.join("eval.txt"), testkit::synthetic_text(80)).unwrap();
    let quantized = root.join("rtn");
    let o = awq(&[
        "quantize",
        s(&t.dir),
        "--out",
        s(&quantized),
        "--mode",
        "rtn",
        "--group-size",
        "16",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let json = root.join("kl.json");
    let o = awq(&[
        "eval",
        s(&quantized),
        "--data",
        s(&root.join("eval.txt")),
        "--ctx",
        "64",
        "--windows",
        "3",
        "--kl-base",
        s(&t.dir),
        "--json",
        s(&json),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("mean KLD") && text(&o).contains("same top token"),
        "{}",
        text(&o)
    );
    let r = testkit::read_json(&json);
    assert_eq!(r["kind"], "kl");
    assert!(r["kl"]["stats"]["kld"]["mean"].as_f64().unwrap() > 0.0);

    // A job: kind "kl" on the quantized model; its report shows KLD beside PPL.
    let job = root.join("job.toml");
    let write_job = |model: &str| {
        std::fs::write(
            &job,
            format!(
                r#"[model]
source = "tiny-llama"
[quant]
method = "rtn"
group_size = 16
[[eval]]
kind = "kl"
data = "eval.txt"
ctx = 64
windows = 3
model = "{model}"
[output]
dir = "out"
"#
            ),
        )
        .unwrap()
    };
    write_job("original");
    let o = awq(&["validate", s(&job)]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("eval[0].model") || text(&o).contains("quantized"),
        "{}",
        text(&o)
    );
    write_job("quantized");
    let o = awq(&["run", s(&job)]);
    assert!(o.status.success(), "{}", text(&o));
    let report = std::fs::read_to_string(root.join("out/report.md")).unwrap();
    assert!(report.contains("mean KLD"), "{report}");
    let r = testkit::read_json(&root.join("out/report.json"));
    assert!(r["evals"][0]["mean_kld"].as_f64().unwrap() > 0.0, "{r}");
}
