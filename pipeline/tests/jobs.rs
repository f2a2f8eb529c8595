//! Job files, `awq run`, `awq batch`, `awq validate` and `awq inspect` end to end on small
//! synthetic models.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{Workspace, awq, digests, list, s, text};

#[test]
fn job_file_errors_name_line_column_and_suggest() {
    let w = Workspace::new(2);
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "group_size = 64",
            "group_sise = 64",
            &[":12:1:", "did you mean group_size?"],
        ),
        (
            "group_size = 64",
            "group_size = \"x\"",
            &[":12:14:", "invalid type"],
        ),
        (
            "group_size = 64",
            "group_size = 48",
            &[":12:14:", "group size 48 does not divide"],
        ),
        (
            "method = \"awq\"",
            "method = \"awq\"\nbits = 8",
            &[":12:8:", "quant.bits: 8 is not supported"],
        ),
        (
            "windows = 4\nmodel = \"original\"",
            "windows = 0\nmodel = \"original\"",
            &[":18:11:", "eval[0].windows: must be at least 1"],
        ),
        (
            "data = \"calib.txt\"",
            "data = \"missing.txt\"",
            &[":6:8:", "calibration.data", "missing.txt does not exist"],
        ),
        (
            "name = \"bad\"",
            "name = \"bad\"\n[runtime]\ntp = 0",
            &["runtime.tp: must be at least 1"],
        ),
        (
            "name = \"bad\"",
            "name = \"bad\"\n[runtime]\ntp = 3",
            &[
                "runtime.tp",
                "4 attention heads are not divisible by 3",
                "tp values that work for this model: 1, 2, 4",
            ],
        ),
        (
            "name = \"bad\"",
            "name = \"bad\"\n[runtime]\ncompute = \"fp16\"",
            &[":5:11:", "unknown variant `fp16`", "`f32`, `bf16`, `amx`, `auto`"],
        ),
        (
            "ctx = 128\nwindows = 4\nmodel = \"quantized\"",
            "ctx = 2\nwindows = 4\nmodel = \"quantized\"",
            &["eval[1].ctx: 2 is too short"],
        ),
        (
            "group_size = 64",
            "group_size = 64\npart = \"1..3\"",
            &[":13:8:", "quant.part", "ends past the model's 2 layers"],
        ),
        (
            "group_size = 64",
            "group_size = 64\npart = \"1-2\"",
            &[":13:8:", "quant.part", "1-2"],
        ),
        (
            "group_size = 64",
            "group_size = 64\npart = \"0..1\"",
            &["eval[1].model", "cannot score a part of a model", "awq merge"],
        ),
    ];
    let base = std::fs::read_to_string(w.job("bad", "out", "")).unwrap();
    for (from, to, expect) in cases {
        assert!(base.contains(from), "{from}");
        let path = w.root.join("bad.toml");
        std::fs::write(&path, base.replacen(from, to, 1)).unwrap();
        let o = awq(&["validate", s(&path)]);
        let msg = text(&o);
        assert!(!o.status.success(), "{to}: validate passed");
        assert!(!msg.contains("panicked"), "{msg}");
        for e in *expect {
            assert!(msg.contains(e), "{to}: expected `{e}` in {msg}");
        }
    }
    let ok = w.job("good", "out", "");
    let o = awq(&["validate", s(&ok)]);
    assert!(o.status.success(), "{}", text(&o));

    // tp = 4 splits the original model (4 heads, kv heads replicated), but the quantized
    // model's o_proj would hold 64 inputs per rank: not whole groups of 128. The job would
    // quantize for minutes and then fail its quantized evaluation, so validate refuses it.
    let path = w.root.join("bad.toml");
    let tp4_g128 = base.replacen("group_size = 64", "group_size = 128", 1).replacen(
        "name = \"bad\"",
        "name = \"bad\"\n[runtime]\ntp = 4",
        1,
    );
    std::fs::write(&path, &tp4_g128).unwrap();
    let o = awq(&["validate", s(&path)]);
    let msg = text(&o);
    assert!(!o.status.success(), "tp = 4 at group size 128 validated: {msg}");
    assert!(
        msg.contains("runtime.tp")
            && msg.contains("the quantized model (group size 128)")
            && msg.contains("64 input features per rank"),
        "{msg}"
    );
    // The same tp at group size 64 is fine.
    std::fs::write(&path, tp4_g128.replacen("group_size = 128", "group_size = 64", 1)).unwrap();
    let o = awq(&["validate", s(&path)]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A job quantizing the workspace's model with AWQ g64 and no evaluations, `quant_extra`
/// appended to its `[quant]` table.
fn quantize_only_job(w: &Workspace, name: &str, quant_extra: &str) -> PathBuf {
    let path = w.root.join(format!("{name}.toml"));
    let body = format!(
        "[model]\nsource = \"model\"\n\n[calibration]\ndata = \"calib.txt\"\nsamples = 16\nseq_len = 128\n\n\
         [quant]\ngroup_size = 64\n{quant_extra}\n[runtime]\ncompute = \"f32\"\n\n[output]\ndir = \"{name}\"\n"
    );
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn parts_of_a_job_merge_into_the_whole_jobs_checkpoint() {
    let w = Workspace::new(3);
    let run = |job: &Path| {
        let o = awq(&["run", s(job)]);
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    run(&quantize_only_job(&w, "whole", ""));
    // Parts as a zoo's entries (or CI jobs) would run them, on machines that share nothing.
    let late = quantize_only_job(&w, "late", "part = \"1..3\"");
    let log = run(&late);
    assert!(log.contains("layer 0: run forward unquantized"), "{log}");
    run(&quantize_only_job(&w, "early", "part = \"0..1\""));
    assert!(w.root.join("late/quantized/awq-part.json").is_file());
    let o = awq(&["run", s(&late)]);
    assert!(
        text(&o).contains("nothing to do"),
        "the part's rerun: {}",
        text(&o)
    );

    let merged = w.root.join("merged");
    let o = awq(&[
        "merge",
        s(&w.root.join("late/quantized")),
        s(&w.root.join("early/quantized")),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(digests(&merged), digests(&w.root.join("whole/quantized")));
}

#[test]
fn run_skips_when_done_and_resumes_after_a_kill() {
    let w = Workspace::new(4);
    let job = w.job("resume", "out-a", "");
    let o = awq(&["run", s(&job)]);
    assert!(o.status.success(), "{}", text(&o));
    let out = w.root.join("out-a");
    for f in [
        "manifest.json",
        "report.json",
        "report.md",
        "loss.svg",
        "quantize.json",
        "eval-0-original.json",
        "eval-1-quantized.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(out.join("quantized/model.safetensors").is_file());
    // The job report reads back as the typed report it was written from.
    let report: evaluation::report::JobReport = evaluation::report::read(&out.join("report.json")).unwrap();
    assert!(report.comparisons[0].ppl_quantized > 0.0);
    assert_eq!(report.layer_losses.len(), 4);
    assert!(
        std::fs::read_to_string(out.join("loss.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    let manifest = testkit::read_json(&out.join("manifest.json"));
    assert_eq!(manifest["steps"].as_object().unwrap().len(), 4);

    // A second run does nothing and says so.
    let before = digests(&out);
    let o = awq(&["run", s(&job)]);
    let msg = text(&o);
    assert!(
        o.status.success() && msg.contains("0 steps run, 4 up to date") && msg.contains("nothing to do"),
        "{msg}"
    );
    assert_eq!(digests(&out), before);

    // Kill a second copy of the job during quantization; nothing partial may appear under a
    // final name, and the rerun must finish with the same checkpoint.
    let job_b = w.job("resume-b", "out-b", "");
    let out_b = w.root.join("out-b");
    let mut child = Command::new(env!("CARGO_BIN_EXE_awq"))
        .args(["run", s(&job_b)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let quantizing = || {
        std::fs::read_dir(&out_b)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with(".quantized.partial-"))
            })
            .unwrap_or(false)
    };
    while !quantizing() {
        assert!(Instant::now() < deadline, "quantization never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out_b.join("quantized").exists(),
        "a partial checkpoint appeared under its final name"
    );
    let manifest = testkit::read_json(&out_b.join("manifest.json"));
    assert!(manifest["steps"].get("quantize").is_none());
    assert!(manifest["steps"].get("eval-0-original").is_some());

    let o = awq(&["run", s(&job_b)]);
    let msg = text(&o);
    assert!(o.status.success(), "{msg}");
    assert!(
        msg.contains("leftover") && msg.contains("eval-0-original: up to date"),
        "{msg}"
    );
    assert_eq!(digests(&out_b.join("quantized")), digests(&out.join("quantized")));
    let ppl = |dir: &Path| {
        testkit::read_json(&dir.join("eval-1-quantized.json"))["ppl"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(ppl(&out_b), ppl(&out));
}

#[test]
fn output_of_another_job_is_not_overwritten() {
    let w = Workspace::new(2);
    let a = w.job("first", "shared-out", "");
    assert!(awq(&["run", s(&a)]).status.success());
    let b = w.job("second", "shared-out", "\n[runtime]\nthreads = 1\n");
    let o = awq(&["run", s(&b)]);
    assert!(
        !o.status.success() && text(&o).contains("holds the outputs of another job"),
        "{}",
        text(&o)
    );
    // A hand-edited manifest (a hash too short to abbreviate) is an error, not a panic.
    let manifest = w.root.join("shared-out/manifest.json");
    let edited = std::fs::read_to_string(&manifest).unwrap().replacen(
        "\"canonical_sha256\": \"",
        "\"canonical_sha256\": \"ab\", \"was\": \"",
        1,
    );
    std::fs::write(&manifest, edited).unwrap();
    let o = awq(&["run", s(&b)]);
    let msg = text(&o);
    assert!(
        !o.status.success()
            && msg.contains("holds the outputs of another job")
            && msg.contains("canonical hash ab)"),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    let o = awq(&["run", s(&b), "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::create_dir_all(w.root.join("foreign")).unwrap();
    std::fs::write(w.root.join("foreign/notes.txt"), "mine").unwrap();
    let c = w.job("third", "foreign", "");
    let o = awq(&["run", s(&c)]);
    assert!(
        !o.status.success() && text(&o).contains("no manifest.json"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(w.root.join("foreign/notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn batch_shards_cover_the_zoo_and_survive_a_failure() {
    let w = Workspace::new(2);
    let zoo = w.root.join("zoo.toml");
    std::fs::write(
        &zoo,
        r#"[defaults.model]
source = "model"
[defaults.calibration]
data = "calib.txt"
samples = 32
seq_len = 256
[defaults.quant]
group_size = 64
[[defaults.eval]]
kind = "perplexity"
data = "eval.txt"
ctx = 128
windows = 2
model = "original"
[[defaults.eval]]
kind = "perplexity"
data = "eval.txt"
ctx = 128
windows = 2
model = "quantized"
[defaults.output]
dir = "zoo-out"

[[entry]]
name = "awq-g64"
[[entry]]
name = "missing-model"
[entry.model]
source = "no-such-model"
[[entry]]
name = "rtn-g64"
[entry.quant]
method = "rtn"
[[entry]]
name = "awq-g32"
[entry.quant]
group_size = 32
[entry.runtime]
threads = 1
"#,
    )
    .unwrap();
    let listed = |shard: &str| -> Vec<String> { list(&zoo, &["--shard", shard]).mine().to_vec() };
    let (a, b) = (listed("0/2"), listed("1/2"));
    let mut all: Vec<String> = a.iter().chain(&b).cloned().collect();
    all.sort();
    assert_eq!(all, vec!["awq-g32", "awq-g64", "missing-model", "rtn-g64"]);
    assert_eq!(a, vec!["awq-g64", "rtn-g64"]);

    // Without --keep-going an invalid entry stops the shard before anything runs.
    let o = awq(&["batch", s(&zoo), "--shard", "1/2"]);
    assert!(
        !o.status.success() && text(&o).contains("missing-model"),
        "{}",
        text(&o)
    );
    assert!(!w.root.join("zoo-out/awq-g32").exists());
    // With it, the others complete and the exit code is still non-zero.
    let o = awq(&["batch", s(&zoo), "--shard", "1/2", "--keep-going"]);
    let msg = text(&o);
    assert!(!o.status.success(), "{msg}");
    assert!(
        msg.contains("| missing-model | invalid |") && msg.contains("| awq-g32 | ok |"),
        "{msg}"
    );
    assert!(w.root.join("zoo-out/awq-g32/report.md").is_file());
    // Each entry runs with its own runtime.threads: awq-g32 asks for one thread, the others
    // take every CPU.
    let threads = |entry: &str| {
        testkit::read_json(&w.root.join(format!("zoo-out/{entry}/eval-0-original.json")))["threads"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(threads("awq-g32"), 1);
    let o = awq(&["batch", s(&zoo), "--shard", "0/2"]);
    assert!(o.status.success(), "{}", text(&o));
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(threads("awq-g64"), cpus);
    let cfg = testkit::read_json(&w.root.join("zoo-out/rtn-g64/quantized/config.json"));
    assert_eq!(cfg["quantization_config"]["group_size"], 64);
}

#[test]
fn inspect_checks_awq_format() {
    let tmp = testkit::tiny_with_tokenizer("tiny-llama");
    let model = tmp.dir.clone();
    let out = tmp.root().join("q");
    assert!(
        awq(&[
            "quantize",
            s(&model),
            "--out",
            s(&out),
            "--mode",
            "rtn",
            "--group-size",
            "16"
        ])
        .status
        .success()
    );
    let o = awq(&["inspect", s(&out)]);
    assert!(
        o.status.success() && text(&o).contains("format: ok"),
        "{}",
        text(&o)
    );
    // Drop one tensor: inspect names it and fails.
    let broken = tmp.root().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(out.join("config.json"), broken.join("config.json")).unwrap();
    let ck = checkpoint::Checkpoint::open(&out).unwrap();
    let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = ck
        .names()
        .into_iter()
        .filter(|n| *n != "model.layers.1.mlp.up_proj.qzeros")
        .map(|n| {
            let t = ck.tensor(n).unwrap();
            (n.to_string(), t.dtype(), t.shape().to_vec(), t.bytes().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = kept
        .iter()
        .map(|(n, d, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &broken.join("model.safetensors")).unwrap();
    let o = awq(&["inspect", s(&broken)]);
    assert!(
        !o.status.success() && text(&o).contains("model.layers.1.mlp.up_proj.qzeros` is missing"),
        "{}",
        text(&o)
    );
}

#[test]
fn shipped_job_files_validate() {
    // They reference the fetched model and the repository's data folder.
    testkit::smollm2_gguf();
    let jobs = testkit::workspace_root().join("jobs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&jobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut args = vec!["validate"];
    args.extend(files.iter().map(|p| s(p)));
    let o = awq(&args);
    assert!(o.status.success(), "{}", text(&o));
    // A zoo file is validated entry by entry.
    for entry in [
        "smollm2-135m-awq-g32",
        "smollm2-135m-awq-g64",
        "smollm2-135m-rtn-g64",
    ] {
        assert!(text(&o).contains(entry), "{entry} not validated: {}", text(&o));
    }
    // The example zoo: its two shards cover each entry exactly once.
    let zoo = jobs.join("zoo-example.toml");
    let shard = |k: &str| -> Vec<String> {
        let o = awq(&["batch", s(&zoo), "--shard", k, "--list"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("invalid"),
            "{}",
            text(&o)
        );
        common::Listing::parse(&String::from_utf8_lossy(&o.stdout))
            .mine()
            .to_vec()
    };
    let mut all = shard("0/2");
    all.extend(shard("1/2"));
    all.sort();
    assert_eq!(
        all,
        vec![
            "smollm2-135m-awq-g32",
            "smollm2-135m-awq-g64",
            "smollm2-135m-rtn-g64"
        ]
    );
}

#[test]
fn one_run_per_output_folder() {
    let w = Workspace::new(2);
    let job = w.job("locked", "out", "");
    let out = w.root.join("out");
    // Another run (here: this test) holds the folder's lock and has written its name.
    let lock_file = w.root.join("out.lock");
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&lock_file)
        .unwrap();
    held.try_lock().unwrap();
    std::fs::write(
        &lock_file,
        r#"{"pid":424242,"host":"runner-7","started":"2026-12-03T10:00:00Z"}"#,
    )
    .unwrap();
    let o = awq(&["run", s(&job)]);
    let msg = text(&o);
    assert!(
        !o.status.success(),
        "ran while another run held the folder: {msg}"
    );
    assert!(
        msg.contains("in use by another run")
            && msg.contains("pid 424242 on runner-7, since 2026-12-03T10:00:00Z")
            && msg.contains("--wait"),
        "{msg}"
    );
    assert!(!out.exists(), "the refused run wrote into the folder");

    // With --wait it runs once the holder lets go.
    let mut waiting = Command::new(env!("CARGO_BIN_EXE_awq"))
        .args(["run", s(&job), "--wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(waiting.try_wait().unwrap().is_none(), "--wait did not wait");
    assert!(!out.exists());
    drop(held);
    let o = waiting.wait_with_output().unwrap();
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && msg.contains("waiting"), "{msg}");

    // A lock file left by a run that was killed (its name still in it, no lock held) is stale:
    // the next run takes it over.
    std::fs::write(
        &lock_file,
        r#"{"pid":424243,"host":"runner-8","started":"2026-12-03T11:00:00Z"}"#,
    )
    .unwrap();
    let o = awq(&["run", s(&job)]);
    let msg = text(&o);
    assert!(
        o.status.success() && msg.contains("taking it over") && msg.contains("pid 424243"),
        "{msg}"
    );

    // Two runs started together: each waits its turn, one does the work, the other finds it
    // done; the folder holds what a single run writes.
    let single = w.job("single", "single-out", "");
    assert!(awq(&["run", s(&single)]).status.success());
    let racing = w.job("racing", "race-out", "");
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_awq"))
                .args(["run", s(&racing), "--wait"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let logs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            let msg = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(o.status.success(), "{msg}");
            msg
        })
        .collect();
    let worked = logs.iter().filter(|l| l.contains("quantize: running")).count();
    assert_eq!(worked, 1, "both runs quantized:\n{}", logs.join("\n---\n"));
    let race = w.root.join("race-out");
    assert_eq!(
        digests(&race.join("quantized")),
        digests(&w.root.join("single-out/quantized"))
    );
    let manifest = testkit::read_json(&race.join("manifest.json"));
    assert_eq!(manifest["steps"].as_object().unwrap().len(), 4);
}
