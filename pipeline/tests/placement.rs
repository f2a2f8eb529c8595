//! Placement from the command line: `awq devices`, `awq plan`, `awq shard` and `awq eval` on a
//! pre-sharded folder, and a job whose evaluations the planner places.

use std::path::Path;

mod common;

use common::{awq, s, text};

#[test]
fn devices_without_a_gpu_is_one_line_and_success() {
    let o = awq(&["devices"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    #[cfg(feature = "cuda")]
    let gpu = cuda_kernels::cuda_available().is_ok();
    #[cfg(not(feature = "cuda"))]
    let gpu = false;
    if gpu {
        assert!(out.contains("| GPU | name | memory |"), "{out}");
    } else {
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.starts_with("no GPU:") && out.contains("--device-memory"),
            "{out}"
        );
    }
}

#[test]
fn plan_chooses_and_explains() {
    let config = testkit::fixture("configs/smollm2-135m.json");
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("plan.json");
    let o = awq(&[
        "plan",
        s(&config),
        "--devices",
        "2",
        "--device-memory",
        "24GiB",
        "--awq-group-size",
        "64",
        "--ctx",
        "4096",
        "--batch",
        "8",
        "--json",
        s(&json),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("chosen: tp 1 × pp 2, layers per stage [15, 15]"),
        "{out}"
    );
    assert!(
        out.contains("- tp 2 × pp 1: tensor parallelism tp = 2: 9 attention heads are not divisible by 2"),
        "{out}"
    );
    assert!(
        out.contains("| rank | stage | layers | weights | KV cache | activations | reserve | free |"),
        "{out}"
    );
    let decision = testkit::read_json(&json);
    assert_eq!(decision["chosen"]["pp"], 2);
    assert_eq!(decision["chosen"]["devices"].as_array().unwrap().len(), 2);
    // Too little memory: the error gives what would do.
    let o = awq(&[
        "plan",
        s(&config),
        "--devices",
        "1",
        "--device-memory",
        "512MiB",
        "--awq-group-size",
        "64",
    ]);
    let out = text(&o);
    assert!(
        !o.status.success() && out.contains("the smallest device memory that would hold it is"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_sharded_folder_evaluates_like_its_source() {
    let tiny = testkit::tiny_with_tokenizer("tiny-llama");
    let data = tiny.root().join("text.txt");
    std::fs::write(&data, testkit::synthetic_text(400)).unwrap();
    let sharded = tiny.root().join("sharded");
    let o = awq(&[
        "shard",
        s(&tiny.dir),
        "--tp",
        "2",
        "--pp",
        "3",
        "--out",
        s(&sharded),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for r in 0..6 {
        assert!(sharded.join(format!("rank{r}.safetensors")).is_file());
    }
    let eval = |model: &Path, extra: &[&str], json: &str| -> serde_json::Value {
        let path = tiny.root().join(json);
        let mut args = vec![
            "eval",
            s(model),
            "--data",
            s(&data),
            "--ctx",
            "64",
            "--windows",
            "6",
            "--json",
            s(&path),
        ];
        args.extend(extra);
        let o = awq(&args);
        assert!(o.status.success(), "{}", text(&o));
        testkit::read_json(&path)
    };
    let direct = eval(&tiny.dir, &["--tp", "2", "--pp", "3"], "direct.json");
    let from_files = eval(&sharded, &[], "sharded.json");
    assert_eq!(direct["ppl"], from_files["ppl"]);
    assert_eq!(from_files["placement"]["shards"]["tp"], 2);
    assert_eq!(from_files["layer_stages"], serde_json::json!([0, 1, 2]));
    for r in 0..6 {
        let file = checkpoint::Checkpoint::open_file(&sharded, &format!("rank{r}.safetensors")).unwrap();
        assert_eq!(from_files["rank_loaded_bytes"][r], file.data_bytes(), "rank {r}");
    }
    assert_eq!(from_files["stage_seconds"].as_array().unwrap().len(), 3);
    let o = awq(&[
        "eval",
        s(&sharded),
        "--data",
        s(&data),
        "--ctx",
        "64",
        "--tp",
        "1",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("pre-sharded for tp = 2, pp = 3"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_job_lets_the_planner_place_its_evaluations() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    testkit::SyntheticLlama {
        hidden: 256,
        intermediate: 512,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        seed: 5,
    }
    .write(&root.join("model"));
    std::fs::write(root.join("eval.txt"), testkit::synthetic_text(120)).unwrap();
    let job = root.join("job.toml");
    std::fs::write(
        &job,
        r#"[model]
source = "model"
[runtime]
devices = 2
device_memory = "24GiB"
strategy = "auto"
[[eval]]
kind = "perplexity"
data = "eval.txt"
ctx = 128
windows = 2
model = "original"
[output]
dir = "out"
"#,
    )
    .unwrap();
    let o = awq(&["validate", s(&job)]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("placement of the original model:") && out.contains("chosen: tp 1 × pp 2"),
        "{out}"
    );
    let o = awq(&["run", s(&job)]);
    assert!(o.status.success(), "{}", text(&o));
    let report = testkit::read_json(&root.join("out/eval-0-original.json"));
    assert_eq!(
        report["placement"]["stages"]["stages"].as_array().unwrap().len(),
        2
    );
    assert_eq!(report["layer_stages"], serde_json::json!([0, 0, 1, 1]));
    // A forced strategy that cannot fit is refused before any compute, naming the shortfall.
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("device_memory = \"24GiB\"", "device_memory = \"1GiB\"")
            .replace("strategy = \"auto\"", "strategy = \"tp\""),
    )
    .unwrap();
    let o = awq(&["validate", s(&job)]);
    let out = text(&o);
    assert!(
        !o.status.success() && out.contains("runtime.devices") && out.contains("does not fit: needs"),
        "{out}"
    );
}
