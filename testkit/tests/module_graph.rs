//! The workspace's structure, checked: no crate's top-level modules import each other in a
//! cycle (a module that needs another's internals and is needed back is one module, or a
//! third one is missing), and the crates depend on each other in the one direction of the
//! data flow (`docs/architecture.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`model` for `src/model.rs`,
/// `backend` for `src/backend/cpu/mod.rs`); `None` for the crate root.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The names a `crate::…` path starts with in `text`, braces of grouped imports included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(j, _)| j);
            let mut level = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => level += 1,
                    '}' => level -= 1,
                    ',' if level == 0 => {
                        let head: String = item
                            .trim()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        names.insert(head);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            names.insert(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    names
}

/// Edges between a crate's top-level modules: `a` → `b` when a file of `a` names `crate::b`.
fn module_graph(krate: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let src = krate.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = top_module(&src, file) else {
            continue;
        };
        // Comments name modules without importing them.
        let text: String = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let edges = graph.entry(from.clone()).or_default();
        for to in crate_paths(&text) {
            if to != from && modules.contains(&to) {
                edges.insert(to);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

const CRATES: [&str; 9] = [
    "checkpoint",
    "cuda-kernels",
    "tp-runtime",
    "awq-calib",
    "awq-pack",
    "generation",
    "evaluation",
    "pipeline",
    "testkit",
];

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let root = testkit::workspace_root();
    for krate in CRATES {
        let graph = module_graph(&root.join(krate));
        assert!(graph.len() > 1 || krate == "testkit", "{krate}: no modules found");
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "{krate}: modules import each other in a cycle: {}",
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let text = "use crate::{a::X, b::{c, d}, Error};\nfn f() { crate::e::g(); }";
    assert_eq!(
        crate_paths(text),
        ["Error", "a", "b", "e"].map(String::from).into_iter().collect()
    );
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("model".into()).or_default().insert("shard".into());
    graph.entry("shard".into()).or_default().insert("load".into());
    assert_eq!(find_cycle(&graph), None);
    graph.entry("load".into()).or_default().insert("model".into());
    assert_eq!(
        find_cycle(&graph).unwrap(),
        ["load", "model", "shard", "load"].map(String::from)
    );
}

/// Each crate's dependencies on the workspace's other crates, from its Cargo.toml.
fn workspace_dependencies(krate: &str) -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(testkit::workspace_root().join(krate).join("Cargo.toml")).unwrap();
    let mut deps = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_deps = line.trim() == "[dependencies]";
            continue;
        }
        if in_deps
            && let Some(name) = line.split(['.', ' ', '=']).next()
            && CRATES.contains(&name)
        {
            deps.insert(name.to_string());
        }
    }
    deps
}

#[test]
fn crates_depend_on_each_other_in_the_direction_of_the_data_flow() {
    // Each crate may use only crates earlier in the flow: files → kernels → runtime →
    // calibration → quantization → generation → evaluation → the command line.
    let order = &CRATES[..8];
    for (i, krate) in order.iter().enumerate() {
        for dep in workspace_dependencies(krate) {
            let j = order.iter().position(|c| *c == dep).unwrap_or(usize::MAX);
            assert!(
                j < i,
                "{krate} depends on {dep}, which comes after it in the flow"
            );
        }
    }
}
