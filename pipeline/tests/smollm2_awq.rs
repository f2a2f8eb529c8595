//! The quantization issue's acceptance run on SmolLM2-135M (f32 import, group size 64,
//! 128 calibration records of 512-token blocks from wikitext2-valid.txt, `full` protocol at
//! ctx 512 on the first 40 windows of wiki.test.raw), through the `awq` binary:
//! AWQ beats RTN and closes at least 40 % of the RTN → f32 gap; the W4A16 runtime equals the
//! checkpoint's own dequantization; peak memory stays below the f32 model plus the
//! calibration activations. The search and the AWQ evaluation run with the default compute
//! (`auto`: AMX or `vdpbf16ps` where the CPU has a 16-bit path faster than f32); where they
//! do, the 16-bit path is checked against f32 (the compute issue's quality guards).

use std::path::Path;
use std::process::Command;

use checkpoint::Tokenizer;
use evaluation::perplexity::{Protocol, WindowPlan, evaluate};
use tp_runtime::{CpuBackend, Model};

fn awq(args: &[&str]) -> serde_json::Value {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_awq"))
        .args(args)
        .arg("--json")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "awq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    testkit::read_json(tmp.path())
}

fn ppl(model: &Path, data: &Path, compute: &str) -> serde_json::Value {
    awq(&[
        "eval",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "512",
        "--windows",
        "40",
        "--compute",
        compute,
    ])
}

/// The acceptance job's quantization of `model` into `out` (AWQ g64, 128 records of 512-token
/// blocks of the calibration text), with `extra` flags; its report.
fn quantize_g64(model: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let calib = testkit::calib_text();
    let mut args = vec![
        "quantize",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--group-size",
        "64",
        "--samples",
        "128",
        "--seq-len",
        "512",
    ];
    args.extend_from_slice(extra);
    awq(&args)
}

/// |a − b| / b.
fn relative(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

/// PPL of the first `windows` windows, in process, for a dense or AWQ checkpoint.
fn ppl_in_process(model: &Path, tokens: &[u32], windows: usize) -> f64 {
    let m = Model::load(model, CpuBackend::new()).unwrap();
    let plan = WindowPlan::new(tokens.len(), 512, Some(windows), Protocol::Full, None).unwrap();
    evaluate(&m, tokens, &plan, 1, |_, _| {}).unwrap().ppl
}

#[test]
fn awq_closes_the_rtn_gap_on_smollm2() {
    let model = testkit::smollm2_f32();
    let data = testkit::wiki_test();
    let reference = testkit::fixture("smollm2-135m/ppl_reference.json");
    let tmp = tempfile::tempdir().unwrap();
    let (rtn_dir, awq_dir) = (tmp.path().join("rtn"), tmp.path().join("awq"));
    let m = model.to_str().unwrap();
    awq(&[
        "quantize",
        m,
        "--out",
        rtn_dir.to_str().unwrap(),
        "--mode",
        "rtn",
        "--group-size",
        "64",
    ]);
    let report = quantize_g64(&model, &awq_dir, &[]);

    let ppl_fp = testkit::read_json(&reference)["transformers"]["ctx512_first40"]["full_window"]["ppl"]
        .as_f64()
        .unwrap();
    let ppl_rtn = ppl(&rtn_dir, &data, "auto")["ppl"].as_f64().unwrap();
    let ppl_awq = ppl(&awq_dir, &data, "auto")["ppl"].as_f64().unwrap();
    let closed = (ppl_rtn - ppl_awq) / (ppl_rtn - ppl_fp);
    eprintln!(
        "f32 {ppl_fp:.4}  RTN {ppl_rtn:.4}  AWQ {ppl_awq:.4}: AWQ closes {:.1} % of the gap",
        100.0 * closed
    );
    assert!(
        ppl_awq < ppl_rtn,
        "AWQ {ppl_awq} is not better than RTN {ppl_rtn}"
    );
    assert!(
        closed >= 0.4,
        "AWQ closes only {:.1} % of the RTN gap",
        100.0 * closed
    );

    // Peak memory: below the f32 model plus the calibration activations (one layer's captured
    // inputs and the residual stream, f32).
    let q = &report["quantization"];
    let tokens = q["calibration"]["tokens"].as_u64().unwrap() as f64;
    let (h, i) = (576.0, 1536.0);
    let activations = tokens * (h + h + h + h + i) * 4.0;
    let model_bytes = std::fs::metadata(model.join("model.safetensors")).unwrap().len() as f64;
    let peak = report["peak_rss_bytes"].as_f64().unwrap();
    eprintln!(
        "peak RSS {:.0} MB; f32 model {:.0} MB + activations {:.0} MB",
        peak / 1e6,
        model_bytes / 1e6,
        activations / 1e6
    );
    assert!(peak < model_bytes + activations, "peak RSS {peak} bytes");
    assert_eq!(q["layers"].as_array().unwrap().len(), 30);
    assert_eq!(q["calibration"]["records_used"], 128);
    for file in report["output"].as_array().unwrap() {
        eprintln!(
            "{}: SHA-256 {}",
            file["path"].as_str().unwrap(),
            file["sha256"].as_str().unwrap()
        );
    }
    eprintln!("quantization seconds: {}", q["seconds"]);

    // 16-bit compute against f32, where `auto` takes 16 bits on this CPU (40 windows each):
    // `amx` on Intel with AMX, `bf16` on AMD with AVX512-BF16.
    let sixteen = tp_runtime::ComputeRequest::Auto.resolve_here(true).unwrap();
    if sixteen == tp_runtime::Compute::F32 {
        testkit::skip::unavailable(
            "awq_closes_the_rtn_gap_on_smollm2 (16-bit quality guards)",
            testkit::skip::Condition::Amx,
            "auto runs f32 on this CPU (no AMX, and no vdpbf16ps faster than f32)",
        );
    } else {
        let path = sixteen.to_string();
        assert_eq!(q["compute"], path.as_str(), "auto searches in {path} on this CPU");
        // The AWQ checkpoint evaluated in 16 bits (auto) and in f32.
        let ppl_awq_f32 = ppl(&awq_dir, &data, "f32")["ppl"].as_f64().unwrap();
        eprintln!("AWQ PPL: {path} compute {ppl_awq:.4}, f32 compute {ppl_awq_f32:.4}");
        assert!(
            relative(ppl_awq, ppl_awq_f32) < 0.002,
            "{path} {ppl_awq} vs f32 {ppl_awq_f32}"
        );
        // The original model in 16 bits against f32 (transformers' f32 figure, which our f32
        // path reproduces within 1e-5: evaluation/tests/smollm2.rs).
        let ppl_fp_16 = ppl(&model, &data, &path)["ppl"].as_f64().unwrap();
        eprintln!("f32 model PPL: {path} compute {ppl_fp_16:.4}, f32 {ppl_fp:.4}");
        assert!(
            relative(ppl_fp_16, ppl_fp) < 0.002,
            "{path} {ppl_fp_16} vs f32 {ppl_fp}"
        );
        // The 16-bit-searched checkpoint against the f32-searched one, both evaluated in f32:
        // no worse by more than 0.3 % (the two searches may pick different scales; bf16's
        // choices happened to be better, 32.98 against 33.18).
        let f32_search = testkit::read_json(&testkit::fixture("smollm2-135m/awq_g64_f32_search.json"));
        let ppl_f32_search = f32_search["ctx512_first40"]["ppl"].as_f64().unwrap();
        eprintln!("AWQ searched in {path} {ppl_awq_f32:.4}, in f32 {ppl_f32_search:.4}");
        assert!(
            ppl_awq_f32 < ppl_f32_search * 1.003,
            "{path} search {ppl_awq_f32} vs f32 search {ppl_f32_search}"
        );
    }

    // The W4A16 runtime computes exactly what the dequantized weights compute.
    let dense = tmp.path().join("dense");
    testkit::awq::dequantize_checkpoint(&awq_dir, &dense);
    let text = std::fs::read_to_string(&data).unwrap();
    let tokens = Tokenizer::from_dir(&model).unwrap().encode(&text, false).unwrap();
    let (packed, unpacked) = (
        ppl_in_process(&awq_dir, &tokens, 10),
        ppl_in_process(&dense, &tokens, 10),
    );
    assert!(
        ((packed - unpacked) / unpacked).abs() < 1e-4,
        "W4A16 PPL {packed} vs dequantized {unpacked}"
    );
}

/// The search computed in f32 writes, byte for byte, the checkpoint recorded for this CPU in
/// `fixtures/smollm2-135m/awq_g64_f32_search.json` (its SHA-256; the CI machine's is there),
/// and that checkpoint evaluates in f32 to the recorded perplexity, which is AutoAWQ's within
/// 0.1 % (33.17).
#[test]
fn an_f32_search_writes_the_recorded_checkpoint() {
    const TEST: &str = "an_f32_search_writes_the_recorded_checkpoint";
    let fixture = testkit::read_json(&testkit::fixture("smollm2-135m/awq_g64_f32_search.json"));
    let cpu = testkit::machine::cpu_key().unwrap_or_default();
    let Some(record) = fixture["checkpoints_by_cpu"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cpu"] == cpu.as_str())
    else {
        testkit::skip::unavailable(
            TEST,
            testkit::skip::Condition::RecordedCpu,
            &format!("no checkpoint is recorded for this CPU ({cpu})"),
        );
        return;
    };
    let model = testkit::smollm2_f32();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("awq");
    quantize_g64(&model, &out, &["--compute", "f32"]);
    let sha = checkpoint::digest::sha256_file(&out.join("model.safetensors")).unwrap();
    assert_eq!(
        sha,
        record["model_safetensors_sha256"].as_str().unwrap(),
        "the f32 search wrote other bytes than those recorded for this CPU ({})",
        record["machine"]
    );
    let ppl = ppl(&out, &testkit::wiki_test(), "f32")["ppl"].as_f64().unwrap();
    let recorded = record["ctx512_first40_ppl_f32"].as_f64().unwrap();
    assert!(
        relative(ppl, recorded) < 1e-9,
        "f32 PPL {ppl} vs recorded {recorded}"
    );
    assert!(relative(ppl, 33.17) < 1e-3, "f32 PPL {ppl} vs AutoAWQ's 33.17");
}
