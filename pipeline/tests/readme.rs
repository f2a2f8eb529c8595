//! The README and `docs/commands.md` stay true to the binary: every `awq` command they show
//! (in ```sh blocks and in inline code) names a subcommand that exists, every `--flag` it
//! uses is an option in that subcommand's `--help`, and every job file it names exists; and
//! `docs/commands.md` describes every subcommand the binary has. The same checker reads the
//! scheduler examples (`examples.rs`).

use std::path::PathBuf;

mod common;

use common::help::{awq_commands, check, check_command, help, subcommands_in};

fn doc(path: &str) -> (PathBuf, String) {
    let path = testkit::workspace_root().join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// The shell a Markdown text shows: each ```sh (or bash, shell) block whole, then each inline
/// code span, in which `|` separates alternatives (`--mode awq|rtn`, `\|` in tables) rather
/// than piping.
fn shell_snippets(markdown: &str) -> Vec<String> {
    let mut snippets = Vec::new();
    let mut prose = String::new();
    // Inside a fenced block: whether it is shell, and its lines so far.
    let mut fence: Option<(bool, String)> = None;
    for line in markdown.lines() {
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            match fence.take() {
                Some((shell, body)) => {
                    if shell {
                        snippets.push(body);
                    }
                }
                None => fence = Some((matches!(lang.trim(), "sh" | "bash" | "shell"), String::new())),
            }
        } else if let Some((_, body)) = fence.as_mut() {
            body.push_str(line);
            body.push('\n');
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    for paragraph in prose.split("\n\n") {
        for (i, span) in paragraph.split('`').enumerate() {
            if i % 2 == 1 {
                snippets.push(span.replace('\n', " ").replace("\\|", " ").replace('|', " "));
            }
        }
    }
    snippets
}

/// Every `awq` command a Markdown text shows, as its arguments after `awq`.
fn commands_in(markdown: &str) -> Vec<Vec<String>> {
    shell_snippets(markdown)
        .iter()
        .flat_map(|s| awq_commands(s))
        .collect()
}

fn args(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn readme_commands_exist_with_their_flags() {
    let (path, text) = doc("README.md");
    let commands = commands_in(&text);
    let shown: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
    for want in [
        "run jobs/smollm2-135m-awq.toml",
        "quantize MODEL --out",
        "import-gguf",
        "eval MODEL-awq --data",
        "generate",
        "validate",
        "merge",
        "bench eval",
    ] {
        assert!(
            shown.iter().any(|c| c.starts_with(want)),
            "{}: no `awq {want}` in {shown:#?}",
            path.display()
        );
    }
    assert!(
        commands.len() >= 25,
        "{}: only {} `awq` commands found: {shown:#?}",
        path.display(),
        commands.len()
    );
    for c in &commands {
        check_command(c, &path);
    }
}

#[test]
fn commands_doc_describes_every_subcommand_with_its_flags() {
    let (path, text) = doc("docs/commands.md");
    let commands = commands_in(&text);
    for c in &commands {
        check_command(c, &path);
    }
    let shown: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
    let top = subcommands_in(&help(&[]).unwrap());
    assert!(top.len() >= 10, "`awq --help` lists {top:?}");
    for name in &top {
        let nested = subcommands_in(&help(std::slice::from_ref(name)).unwrap());
        let wanted = std::iter::once(name.clone()).chain(nested.iter().map(|n| format!("{name} {n}")));
        for want in wanted {
            assert!(
                shown
                    .iter()
                    .any(|c| *c == want || c.starts_with(&format!("{want} "))),
                "{}: `awq {want}` is not described",
                path.display()
            );
        }
    }
}

/// The checker can fail: made-up flags, subcommands and job files are reported, and the
/// Markdown reader finds commands where the documents put them.
#[test]
fn the_checker_rejects_what_the_binary_lacks() {
    assert_eq!(
        check(&args(
            "quantize MODEL --out OUT --calib data/wikitext2-valid.txt --part 0..2"
        )),
        Ok(())
    );
    assert_eq!(check(&args("batch merge shards --md OUT.md")), Ok(()));
    assert_eq!(check(&args("run JOB.toml --wait")), Ok(()));
    let bogus = check(&args("quantize MODEL --out OUT --no-such-flag")).unwrap_err();
    assert!(bogus.contains("has no flag --no-such-flag"), "{bogus}");
    // A flag of another subcommand; one of `batch` but not of `batch merge`.
    assert!(check(&args("inspect DIR --calib FILE")).is_err());
    assert!(check(&args("batch merge shards --shard 0/2")).is_err());
    assert!(check(&args("bench eval DIR --no-such-flag")).is_err());
    assert!(check(&args("no-such-command DIR")).is_err());
    assert!(check(&args("run jobs/no-such-job.toml")).is_err());

    let markdown = "Run `awq eval DIR --ctx 512 --compute auto|f32` then\n\
                    `awq plan MODEL [--tp N \\| --layers 8,8]`.\n\n\
                    ```sh\n\
                    vllm serve MODEL --quantization awq\n\
                    cargo run --release -p pipeline -- quantize MODEL \\\n  --out OUT   # a comment\n\
                    ```\n\n\
                    ```toml\n\
                    cmd = \"awq no-such-command\"\n\
                    ```\n";
    assert_eq!(
        commands_in(markdown),
        vec![
            args("quantize MODEL --out OUT"),
            args("eval DIR --ctx 512 --compute auto f32"),
            args("plan MODEL --tp N --layers 8,8"),
        ]
    );
}
