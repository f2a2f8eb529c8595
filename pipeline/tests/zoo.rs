//! Zoos on schedulers: `--shard auto` from each scheduler's environment, round-robin and
//! size-balanced splits that cover the zoo once, shards run in separate folders and merged
//! into one report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::{Listing, Workspace, awq, list, s, text};

/// The variables `--shard auto` reads; cleared so the runner's own environment cannot leak in.
const SCHEDULER_VARIABLES: [&str; 7] = [
    "AWQ_SHARD",
    "AWQ_SHARD_COUNT",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "JOB_COMPLETION_INDEX",
];

fn awq_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_awq"));
    command.args(args);
    for v in SCHEDULER_VARIABLES {
        command.env_remove(v);
    }
    command.envs(env.iter().copied()).output().unwrap()
}

/// Models of mixed sizes (configurations only: enough to plan and estimate, nothing to run).
const MODELS: [&str; 8] = [
    "llama-2-70b",
    "llama-2-7b",
    "qwen2-72b",
    "smollm2-135m",
    "llama-2-13b",
    "mistral-7b",
    "llama-3-8b",
    "qwen2-7b",
];

/// A zoo of [`MODELS`], each quantized with AWQ at group size 128 and evaluated.
fn mixed_zoo(root: &Path) -> PathBuf {
    let configs = testkit::workspace_root().join("fixtures/configs");
    let mut zoo = String::from(
        r#"[defaults.calibration]
data = "calib.txt"
samples = 128
seq_len = 512
[defaults.quant]
group_size = 128
[[defaults.eval]]
kind = "perplexity"
data = "calib.txt"
ctx = 512
windows = 40
model = "original"
[[defaults.eval]]
kind = "kl"
data = "calib.txt"
ctx = 512
windows = 40
model = "quantized"
[defaults.output]
dir = "out"
"#,
    );
    for m in MODELS {
        let dir = root.join(m);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(configs.join(format!("{m}.json")), dir.join("config.json")).unwrap();
        zoo.push_str(&format!(
            "\n[[entry]]\nname = \"{m}\"\n[entry.model]\nsource = \"{m}\"\n"
        ));
        if m == "smollm2-135m" {
            // 576 input features: whole groups of 64, not of 128.
            zoo.push_str("[entry.quant]\ngroup_size = 64\n");
        }
    }
    std::fs::write(root.join("calib.txt"), testkit::synthetic_text(50)).unwrap();
    let path = root.join("zoo.toml");
    std::fs::write(&path, zoo).unwrap();
    path
}

#[test]
fn every_split_covers_the_zoo_once() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = mixed_zoo(tmp.path());
    for balance in ["round-robin", "size"] {
        for count in 1..=4 {
            let shards: Vec<Listing> = (0..count)
                .map(|k| list(&zoo, &["--balance", balance, "--shard", &format!("{k}/{count}")]))
                .collect();
            // Every machine computes the same split, each marks its own shard.
            for (k, l) in shards.iter().enumerate() {
                assert_eq!(l.this, k);
                assert_eq!(l.shards, shards[0].shards, "{balance} {k}/{count}");
            }
            let mut all: Vec<&String> = shards[0].shards.iter().flatten().collect();
            all.sort();
            let mut expected: Vec<String> = MODELS.iter().map(|m| m.to_string()).collect();
            expected.sort();
            assert_eq!(all, expected.iter().collect::<Vec<_>>(), "{balance} over {count}");
        }
    }
    // Round-robin puts the two ~70B models on one machine of two; by size they are apart,
    // and the most loaded machine carries less.
    let rr = list(&zoo, &["--shard", "0/2"]);
    let by_size = list(&zoo, &["--shard", "0/2", "--balance", "size"]);
    let shard_of = |l: &Listing, m: &str| l.shards.iter().position(|s| s.iter().any(|e| e == m)).unwrap();
    assert_eq!(shard_of(&rr, "llama-2-70b"), shard_of(&rr, "qwen2-72b"));
    assert_ne!(shard_of(&by_size, "llama-2-70b"), shard_of(&by_size, "qwen2-72b"));
    let max = |l: &Listing| l.costs.iter().copied().fold(0.0, f64::max);
    assert!(max(&by_size) < max(&rr), "{:?} vs {:?}", by_size.costs, rr.costs);
    // Both splits list the same total cost.
    let total = |l: &Listing| l.costs.iter().sum::<f64>();
    assert!(
        (total(&rr) - total(&by_size)).abs() <= 1e-3 * total(&rr),
        "costs are printed to 4 digits"
    );
}

#[test]
fn shard_auto_reads_each_scheduler() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = mixed_zoo(tmp.path());
    let this = |env: &[(&str, &str)]| -> (usize, usize) {
        let o = awq_env(&["batch", s(&zoo), "--shard", "auto", "--list"], env);
        assert!(o.status.success(), "{env:?}: {}", text(&o));
        let l = Listing::parse(&String::from_utf8_lossy(&o.stdout));
        (l.this, l.shards.len())
    };
    // A GitHub Actions matrix (or anything else) sets AWQ_SHARD.
    assert_eq!(this(&[("AWQ_SHARD", "1/3")]), (1, 3));
    // A Slurm array `--array=1-3`: task 2 is the second of three.
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "2"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_MAX", "3"),
    ];
    assert_eq!(this(&slurm), (1, 3));
    assert_eq!(
        this(&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "4")]),
        (3, 4)
    );
    // A Kubernetes Indexed Job of 4 completions.
    assert_eq!(
        this(&[("JOB_COMPLETION_INDEX", "2"), ("AWQ_SHARD_COUNT", "4")]),
        (2, 4)
    );
    // Nothing set, or a count missing: the error names what it looked for.
    let o = awq_env(&["batch", s(&zoo), "--shard", "auto", "--list"], &[]);
    let msg = text(&o);
    assert!(!o.status.success(), "{msg}");
    for v in [
        "AWQ_SHARD",
        "SLURM_ARRAY_TASK_ID",
        "JOB_COMPLETION_INDEX",
        "AWQ_SHARD_COUNT",
    ] {
        assert!(msg.contains(v), "{v} not named: {msg}");
    }
    let o = awq_env(
        &["batch", s(&zoo), "--shard", "auto", "--list"],
        &[("JOB_COMPLETION_INDEX", "0")],
    );
    assert!(
        !o.status.success() && text(&o).contains("AWQ_SHARD_COUNT"),
        "{}",
        text(&o)
    );
    let o = awq_env(
        &["batch", s(&zoo), "--shard", "auto", "--list"],
        &[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_COUNT", "4")],
    );
    assert!(
        !o.status.success() && text(&o).contains("shard 4 of 4"),
        "{}",
        text(&o)
    );
}

/// The zoo of the merge test: three quantizations of one synthetic model, each evaluated
/// (perplexity of the original, perplexity and KL divergence of the quantized model).
fn synthetic_zoo(w: &Workspace) -> String {
    let at = |f: &str| w.root.join(f).display().to_string();
    format!(
        r#"[defaults.model]
source = "{model}"
[defaults.calibration]
data = "{calib}"
samples = 32
seq_len = 256
[defaults.quant]
group_size = 64
[[defaults.eval]]
kind = "perplexity"
data = "{eval}"
ctx = 128
windows = 2
model = "original"
[[defaults.eval]]
kind = "kl"
data = "{eval}"
ctx = 128
windows = 2
model = "quantized"
[defaults.output]
dir = "out"

[[entry]]
name = "awq-g64"
[[entry]]
name = "rtn-g64"
[entry.quant]
method = "rtn"
[[entry]]
name = "awq-g32"
[entry.quant]
group_size = 32
"#,
        model = at("model"),
        calib = at("calib.txt"),
        eval = at("eval.txt"),
    )
}

#[test]
fn shards_in_two_folders_merge_into_one_report() {
    let w = Workspace::new(2);
    let zoo_text = synthetic_zoo(&w);
    // Two machines: each has the zoo file in its own folder and writes under it.
    let (a, b) = (w.root.join("machine-a"), w.root.join("machine-b"));
    for dir in [&a, &b] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("zoo.toml"), &zoo_text).unwrap();
    }
    let o = awq_env(&["batch", s(&a.join("zoo.toml")), "--shard", "0/2"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    // The second writes where its scheduler says (--out), not beside the zoo file.
    let b_out = b.join("results");
    let o = awq_env(
        &[
            "batch",
            s(&b.join("zoo.toml")),
            "--shard",
            "auto",
            "--out",
            s(&b_out),
        ],
        &[("AWQ_SHARD", "1/2")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(a.join("out/batch-summary-0-of-2.json").is_file());
    assert!(b_out.join("batch-summary-1-of-2.json").is_file() && !b.join("out").exists());
    assert!(a.join("out/awq-g64").is_dir() && a.join("out/awq-g32").is_dir());
    assert!(b_out.join("rtn-g64").is_dir() && !b_out.join("awq-g64").exists());

    // Merge what the two machines wrote (as downloaded artifacts would be).
    let merged = w.root.join("report");
    std::fs::create_dir_all(&merged).unwrap();
    let (json, md) = (merged.join("zoo.json"), merged.join("zoo.md"));
    let o = awq(&["batch", "merge", s(&a), s(&b), "--json", s(&json), "--md", s(&md)]);
    let msg = text(&o);
    assert!(o.status.success(), "{msg}");
    let report = testkit::read_json(&json);
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["awq-g64", "rtn-g64", "awq-g32"],
        "one row per entry, in zoo order"
    );
    let a_out = a.join("out");
    for (r, dir) in rows.iter().zip([&a_out, &b_out, &a_out]) {
        let name = r["name"].as_str().unwrap();
        assert_eq!(r["status"], "ok", "{r}");
        let (before, after) = (
            r["ppl_original"].as_f64().unwrap(),
            r["ppl_quantized"].as_f64().unwrap(),
        );
        assert!(before > 1.0 && after > 1.0, "{r}");
        assert!(r["mean_kld"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0, "{r}");
        // The row's checkpoint digest is the file's, and its perplexities are the entry's own report's.
        let checkpoint = dir.join(format!("{name}/quantized/model.safetensors"));
        assert_eq!(
            r["checkpoint_sha256"][0].as_str().unwrap(),
            checkpoint::digest::sha256_file(&checkpoint).unwrap()
        );
        let own = testkit::read_json(&dir.join(format!("{name}/report.json")));
        assert_eq!(own["comparisons"][0]["ppl_quantized"].as_f64().unwrap(), after);
        assert!(msg.contains(&format!("| {name} | ok | ")), "{msg}");
    }
    assert_eq!(rows[1]["method"], "rtn");
    assert_eq!(rows[2]["group_size"], 32);
    assert!(report["missing"].as_array().unwrap().is_empty());
    let md_text = std::fs::read_to_string(&md).unwrap();
    assert!(
        md_text.contains("Every entry of the zoo ran once and succeeded"),
        "{md_text}"
    );
    let svg = std::fs::read_to_string(merged.join("zoo.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("awq-g32"),
        "chart without the entries"
    );

    // A shard whose summary never arrived: merge names its entry and fails.
    let summary_b = b_out.join("batch-summary-1-of-2.json");
    let kept = std::fs::read(&summary_b).unwrap();
    std::fs::remove_file(&summary_b).unwrap();
    let o = awq(&["batch", "merge", s(&a), s(&b)]);
    let msg = text(&o);
    assert!(
        !o.status.success() && msg.contains("1 missing (rtn-g64)"),
        "{msg}"
    );
    // A shard merged twice: its entries are duplicated.
    std::fs::write(&summary_b, &kept).unwrap();
    let c = w.root.join("machine-c");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("batch-summary-1-of-2.json"), &kept).unwrap();
    let o = awq(&["batch", "merge", s(&a), s(&b), s(&c)]);
    let msg = text(&o);
    assert!(
        !o.status.success() && msg.contains("1 duplicated (rtn-g64)"),
        "{msg}"
    );
    // A summary of another zoo file is refused.
    let other = kept_with_zoo_sha(&kept, "0".repeat(64));
    std::fs::write(c.join("batch-summary-1-of-2.json"), other).unwrap();
    let o = awq(&["batch", "merge", s(&a), s(&c)]);
    assert!(
        !o.status.success() && text(&o).contains("another zoo file"),
        "{}",
        text(&o)
    );
}

fn kept_with_zoo_sha(summary: &[u8], sha: String) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(summary).unwrap();
    v["zoo_sha256"] = serde_json::Value::String(sha);
    serde_json::to_vec(&v).unwrap()
}
