//! `awq eval --tp N` and `awq plan` end to end: AWQ weights sharded with padding, SmolLM2 at
//! tp = 3 against tp = 1, per-rank memory, and tp values that cannot work.

use std::path::Path;
use std::process::Output;

use checkpoint::Tokenizer;
use tp_runtime::{CpuBackend, Model, PlacementRequest, RankGroup, SeqLayout};

mod common;

use common::{awq, s};

fn ok(o: Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    text
}

fn eval_report(model: &Path, data: &Path, tp: usize, windows: usize, ctx: usize) -> serde_json::Value {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    ok(awq(&[
        "eval",
        s(model),
        "--data",
        s(data),
        "--ctx",
        &ctx.to_string(),
        "--windows",
        &windows.to_string(),
        "--tp",
        &tp.to_string(),
        // Exactness across placements is a property of the f32 reference path; bf16 rounds
        // each rank's partial sums.
        "--compute",
        "f32",
        "--json",
        s(tmp.path()),
    ]));
    testkit::read_json(tmp.path())
}

#[test]
fn awq_with_padded_intermediate_matches_one_rank() {
    // Like Llama-2-7B at group 128, scaled down: intermediate 2752 = 86 groups of 32, so
    // tp = 4 gives 21.5 groups per rank; the plan pads to 22 (704 features per rank).
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense");
    testkit::SyntheticLlama {
        hidden: 256,
        intermediate: 2752,
        layers: 2,
        heads: 8,
        kv_heads: 4,
        vocab: 512,
        seed: 1,
    }
    .write(&dense);
    let quantized = tmp.path().join("awq");
    ok(awq(&[
        "quantize",
        s(&dense),
        "--out",
        s(&quantized),
        "--mode",
        "rtn",
        "--group-size",
        "32",
    ]));
    let plan = ok(awq(&["plan", s(&quantized), "--tp", "4", "--tensors"]));
    assert!(
        plan.contains("intermediate 704 per rank (64 padding in all)"),
        "{plan}"
    );
    assert!(
        plan.contains("model.layers.0.mlp.down_proj.qweight") && plan.contains("[704, 32]"),
        "{plan}"
    );
    let data = tmp.path().join("eval.txt");
    std::fs::write(&data, testkit::synthetic_text(200)).unwrap();
    for model in [&dense, &quantized] {
        let one = eval_report(model, &data, 1, 20, 128)["ppl"].as_f64().unwrap();
        let four = eval_report(model, &data, 4, 20, 128)["ppl"].as_f64().unwrap();
        assert!(
            ((one - four) / one).abs() < 1e-5,
            "{}: tp=4 {four} vs tp=1 {one}",
            model.display()
        );
    }
}

#[test]
fn smollm2_at_tp3_matches_tp1() {
    let model = testkit::smollm2_f32();
    let data = testkit::wiki_test();
    // tp = 2 cannot split 9 heads: refused before any weight is read.
    let o = awq(&["eval", s(&model), "--data", s(&data), "--ctx", "512", "--tp", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "tp = 2 ran");
    assert!(
        err.contains("9 attention heads are not divisible by 2")
            && err.contains("tp values that work for this model: 1, 3, 9"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let awq_dir = tmp.path().join("awq-g64");
    ok(awq(&[
        "quantize",
        s(&model),
        "--out",
        s(&awq_dir),
        "--mode",
        "rtn",
        "--group-size",
        "64",
    ]));
    let text = std::fs::read_to_string(&data).unwrap();
    let window0: Vec<u32> =
        Tokenizer::from_dir(&model).unwrap().encode(&text, false).unwrap()[..512].to_vec();
    for dir in [&model, &awq_dir] {
        // Ten windows: equality, not the PPL figure, is under test here.
        let one = eval_report(dir, &data, 1, 10, 512);
        let three = eval_report(dir, &data, 3, 10, 512);
        let (p1, p3) = (one["ppl"].as_f64().unwrap(), three["ppl"].as_f64().unwrap());
        eprintln!("{}: PPL tp=1 {p1:.6}, tp=3 {p3:.6}", dir.display());
        assert!(
            ((p1 - p3) / p1).abs() < 1e-5,
            "{}: tp=3 {p3} vs tp=1 {p1}",
            dir.display()
        );
        // Each rank holds a third of the weights, plus the replicated norms.
        let whole = one["rank_weight_bytes"][0].as_f64().unwrap();
        let norms = (2.0 * 30.0 + 1.0) * 576.0 * 4.0;
        for bytes in three["rank_weight_bytes"].as_array().unwrap() {
            let share = (whole - norms) / 3.0 + norms;
            let bytes = bytes.as_f64().unwrap();
            assert!(
                (bytes - share).abs() / share < 0.05,
                "rank holds {bytes} bytes, a third is {share}"
            );
        }
        // Logits of window 0 agree.
        let layout = SeqLayout::single(512).unwrap();
        let rows = [0, 100, 255, 400, 511];
        let single = Model::load(dir, CpuBackend::new()).unwrap();
        let hidden = single.forward(&window0, &layout).unwrap();
        let want = single.logits(&hidden, &rows).unwrap();
        drop(single);
        let got = RankGroup::load_cpu(dir, &PlacementRequest::tp(3))
            .unwrap()
            .logits(&window0, &layout, &rows)
            .unwrap();
        let err = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "{}: window-0 logits differ by {err}", dir.display());
    }
}
