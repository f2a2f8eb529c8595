//! The scheduler examples under `examples/` stay copyable: each parses, wires the shards the
//! way its scheduler numbers them, and every `awq` command in it uses a subcommand and flags
//! that exist, with files that exist.

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

mod common;

use common::help::{check_all, check_command};

fn example(path: &str) -> (PathBuf, String) {
    let path = testkit::workspace_root().join("examples").join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

fn yaml(text: &str, path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn github_actions_matrix_shards_then_merges() {
    let (path, text) = example("github-actions/quantize-zoo.yml");
    let docs = yaml(&text, &path);
    let workflow = &docs[0];
    let jobs = &workflow["jobs"];
    let quantize = &jobs["quantize"];
    let shards: Vec<i64> = quantize["strategy"]["matrix"]["shard"]
        .as_vec()
        .expect("a matrix of shards")
        .iter()
        .map(|s| s.as_i64().unwrap())
        .collect();
    let count = shards.len() as i64;
    assert_eq!(shards, (0..count).collect::<Vec<_>>(), "shards are 0..N");
    assert_eq!(
        quantize["env"]["AWQ_SHARD"].as_str(),
        Some(format!("${{{{ matrix.shard }}}}/{count}").as_str())
    );
    assert_eq!(workflow["env"]["SHARDS"].as_i64(), Some(count));
    assert!(workflow["env"]["AWQ_CACHE_DIR"].as_str().is_some());
    let steps = |job: &Yaml| -> Vec<Yaml> { job["steps"].as_vec().unwrap().clone() };
    let uses = |job: &Yaml, action: &str| {
        steps(job)
            .iter()
            .any(|s| s["uses"].as_str().is_some_and(|u| u.starts_with(action)))
    };
    assert!(
        uses(quantize, "actions/upload-artifact"),
        "each shard uploads its output"
    );
    let merge = &jobs["merge"];
    assert_eq!(merge["needs"].as_str(), Some("quantize"));
    assert!(uses(merge, "actions/download-artifact"));
    let runs: String = [quantize, merge]
        .iter()
        .flat_map(|j| steps(j))
        .filter_map(|s| s["run"].as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        runs.contains("--shard auto") && runs.contains("--out \"$OUT_DIR\""),
        "{runs}"
    );
    check_all(&path, &text, &["batch", "batch merge"]);
}

#[test]
fn slurm_array_is_valid_bash_and_shards_by_task() {
    let (path, text) = example("slurm/quantize-zoo.sbatch");
    let o = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        o.status.success(),
        "bash -n {}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.lines().any(|l| l.starts_with("#SBATCH --array=")),
        "an array job"
    );
    assert!(text.contains("export AWQ_CACHE_DIR=") && text.contains("--out \"$OUT_DIR\""));
    assert!(text.contains("--shard auto"));
    check_all(&path, &text, &["batch", "batch merge"]);
}

#[test]
fn kubernetes_indexed_job_counts_its_completions() {
    let (path, text) = example("kubernetes/quantize-zoo.yaml");
    let job = &yaml(&text, &path)[0];
    assert_eq!(job["kind"].as_str(), Some("Job"));
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let completions = spec["completions"].as_i64().unwrap();
    let container = &spec["template"]["spec"]["containers"][0];
    let env: Vec<(String, String)> = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().into(),
                e["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    let var = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(
        var("AWQ_SHARD_COUNT"),
        Some(completions.to_string()),
        "AWQ_SHARD_COUNT must equal completions"
    );
    let cache = var("AWQ_CACHE_DIR").expect("the cache folder is explicit");
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(mounts.contains(&cache.as_str()), "the cache folder is a volume");
    let command: String = [&container["command"], &container["args"]]
        .iter()
        .flat_map(|v| v.as_vec().cloned().unwrap_or_default())
        .map(|v| v.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(command.contains("--shard auto"), "{command}");
    let out = command
        .split("--out ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("--out");
    assert!(
        mounts.iter().any(|m| out.starts_with(m)),
        "the output {out} is on a volume"
    );
    check_all(&path, &command, &["batch"]);
    check_all(&path, &text, &["batch"]);

    let (merge_path, merge_text) = example("kubernetes/merge-zoo.yaml");
    let merge = &yaml(&merge_text, &merge_path)[0];
    let container = &merge["spec"]["template"]["spec"]["containers"][0];
    let command: Vec<String> = container["command"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[..3], ["awq", "batch", "merge"]);
    assert!(
        command[3].starts_with(out),
        "merge reads where the shards wrote: {command:?}"
    );
    check_command(&command[1..], &merge_path);
}
