//! The `awq` commands that documentation and examples show, checked against the binary: each
//! names a subcommand that exists, every `--flag` it uses is an option in that subcommand's
//! `--help`, and every job or zoo file it names exists.

use std::path::Path;

use super::{awq, text};

/// Every `awq …` command in a text (comments included), each as its arguments: shell lines
/// joined across trailing backslashes, `cargo run --release -p pipeline --` read as `awq`,
/// quotes, brackets and YAML flow punctuation dropped. An `awq` that is a flag's value
/// (`vllm serve MODEL --quantization awq`) is not a command.
pub fn awq_commands(text: &str) -> Vec<Vec<String>> {
    let joined = text
        .replace("\\\n", " ")
        .replace("cargo run --release -p pipeline --", "awq");
    let mut commands = Vec::new();
    for line in joined.lines() {
        let tokens: Vec<String> = line
            .split_whitespace()
            .map(|t| t.trim_matches(|c| "\"'[](),#&;".contains(c)).to_string())
            .collect();
        for (i, t) in tokens.iter().enumerate() {
            let flag_value = i > 0 && tokens[i - 1].starts_with("--");
            if (t == "awq" || t.ends_with("/awq")) && !flag_value && i + 1 < tokens.len() {
                let args: Vec<String> = tokens[i + 1..]
                    .iter()
                    .take_while(|a| !a.is_empty() && !a.starts_with('>') && *a != "|")
                    .cloned()
                    .collect();
                if args.first().is_some_and(|a| {
                    !a.starts_with('-') && a.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                }) {
                    commands.push(args);
                }
            }
        }
    }
    commands
}

/// `awq PATH… --help`, or why there is none.
pub fn help(path: &[String]) -> Result<String, String> {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let o = awq(&args);
    if !o.status.success() {
        return Err(format!("`awq {}` is not a command: {}", path.join(" "), text(&o)));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The subcommands a `--help` lists under "Commands:", `help` aside.
pub fn subcommands_in(help: &str) -> Vec<String> {
    let Some((_, list)) = help.split_once("\nCommands:\n") else {
        return Vec::new();
    };
    list.lines()
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Whether a `--help` lists `flag` as an option (`  -h, --help`, `      --out <OUT>`), not
/// merely mentions it in a description.
fn lists_flag(help: &str, flag: &str) -> bool {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split_whitespace()
                .take_while(|t| t.starts_with('-') || t.starts_with('<') || t.starts_with('['))
        })
        .any(|t| t.trim_end_matches(',') == flag)
}

/// Checks one command (its arguments after `awq`): the subcommand path it names (`batch`,
/// `batch merge`, `bench eval`, …) exists, each `--flag` is one of that path's options, and
/// each `.toml` file it names, relative to the clone's root, exists (names without a lowercase
/// letter, `JOB.toml` or `jobs/MY-MODEL.toml`, are placeholders).
pub fn check(args: &[String]) -> Result<(), String> {
    let mut path = vec![args[0].clone()];
    let mut page = help(&path)?;
    while let Some(next) = args.get(path.len()) {
        if !subcommands_in(&page).contains(next) {
            break;
        }
        path.push(next.clone());
        page = help(&path)?;
    }
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        if !lists_flag(&page, flag) {
            return Err(format!("`awq {}` has no flag {flag}:\n{page}", path.join(" ")));
        }
    }
    for file in args
        .iter()
        .filter(|a| a.ends_with(".toml") && !a.starts_with('$'))
    {
        let stem = Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let placeholder = !stem.chars().any(|c| c.is_ascii_lowercase());
        if !placeholder && !testkit::workspace_root().join(file).is_file() {
            return Err(format!("{file} does not exist"));
        }
    }
    Ok(())
}

/// [`check`], failing the test with the file the command came from.
pub fn check_command(args: &[String], file: &Path) {
    if let Err(e) = check(args) {
        panic!("{}: {e}", file.display());
    }
}

/// Every command in `text` checked, and one starting with each of `expect` present.
pub fn check_all(file: &Path, text: &str, expect: &[&str]) {
    let commands = awq_commands(text);
    for want in expect {
        assert!(
            commands.iter().any(|c| c.join(" ").starts_with(want)),
            "{}: no `awq {want}` command in {commands:?}",
            file.display()
        );
    }
    for c in &commands {
        check_command(c, file);
    }
}
