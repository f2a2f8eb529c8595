//! Today's dense families at their real shapes (`fixtures/configs/`), one configuration per
//! family: planned, synthesized at one layer with its real vocabulary (128k–256k tokens, part
//! of the memory every step holds), quantized, format-checked and scored. Their arithmetic is
//! checked against transformers on the tiny models (`tp-runtime/tests/tiny_models.rs`); this
//! is the path at the size people run.

mod common;

use common::{awq, s, text};

fn ok(args: &[&str]) -> String {
    let o = awq(args);
    assert!(o.status.success(), "awq {args:?}: {}", text(&o));
    text(&o)
}

#[test]
fn each_family_plans_synthesizes_quantizes_and_scores_at_its_real_shape() {
    let root = testkit::workspace_root();
    let data = root.join("data/wiki.test.raw");
    let calib = root.join("data/wikitext2-valid.txt");
    for name in [
        "gemma-2-9b",
        "gemma-3-1b",
        "llama-3.1-8b",
        "phi-4-mini",
        "qwen2.5-7b",
        "qwen3-8b",
    ] {
        let started = std::time::Instant::now();
        let config = root.join(format!("fixtures/configs/{name}.json"));
        let tmp = tempfile::tempdir().unwrap();
        let (model, quantized) = (tmp.path().join("model"), tmp.path().join("awq"));
        let plan = ok(&["plan", s(&config), "--devices", "2", "--device-memory", "24GiB"]);
        assert!(plan.contains("chosen: "), "{name}: {plan}");
        ok(&["synth", s(&config), "--out", s(&model), "--layers", "1"]);
        ok(&[
            "quantize",
            s(&model),
            "--out",
            s(&quantized),
            "--calib",
            s(&calib),
            "--samples",
            "2",
            "--seq-len",
            "128",
            "--sampling",
            "windows",
        ]);
        let inspect = ok(&["inspect", s(&quantized)]);
        assert!(inspect.contains("AWQ g128"), "{name}: {inspect}");
        let report = tmp.path().join("eval.json");
        ok(&[
            "eval",
            s(&quantized),
            "--data",
            s(&data),
            "--ctx",
            "64",
            "--windows",
            "1",
            "--json",
            s(&report),
        ]);
        let ppl = testkit::read_json(&report)["ppl"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{name}: PPL {ppl}");
        eprintln!(
            "{name}: one layer at its real shape quantized; PPL of a 64-token window {ppl:.1} ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
}
