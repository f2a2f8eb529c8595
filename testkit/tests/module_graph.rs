//! The workspace's structure, checked:
//! - no two sibling modules of a crate import each other, directly or around a circle (a
//!   module that needs another's internals and is needed back is one module, or a third one
//!   is missing). Every `crate::…`, `super::…` and `self::…` path is read — imports and paths
//!   in code alike, parsed by `syn` — and so are names the crate root re-exports. An import of
//!   an ancestor or a descendant (a child using its parent's trait) is not a sibling edge;
//! - the crates depend on each other in the one direction of the data flow
//!   (`docs/architecture.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module's path inside its crate: `[]` for the root, `["backend", "cpu"]` for
/// `src/backend/cpu.rs` or `src/backend/cpu/mod.rs`.
type ModulePath = Vec<String>;

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

/// The module a file under `src` holds.
fn module_of(src: &Path, file: &Path) -> ModulePath {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut path: ModulePath = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(path.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        path.pop();
    }
    path
}

/// Every path a file names that starts at a module of its own crate (`crate::`, `super::`,
/// `self::`), made absolute: imports (groups, globs and renames flattened) and paths in code.
struct CratePaths {
    /// The file's module, then any inline modules (`mod tests { … }`) we are inside.
    here: ModulePath,
    found: Vec<ModulePath>,
}

impl CratePaths {
    fn resolve(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let absolute = match first.as_str() {
            "crate" => segments[1..].to_vec(),
            "self" => [&self.here[..], &segments[1..]].concat(),
            "super" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                let base = &self.here[..self.here.len().saturating_sub(ups)];
                [base, &segments[ups..]].concat()
            }
            _ => return,
        };
        self.found.push(absolute);
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.resolve(&[&prefix[..], &[n.ident.to_string()]].concat()),
            syn::UseTree::Rename(r) => self.resolve(&[&prefix[..], &[r.ident.to_string()]].concat()),
            syn::UseTree::Glob(_) => self.resolve(prefix),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t)),
        }
    }
}

impl<'ast> Visit<'ast> for CratePaths {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.here.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.here.pop();
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segments);
        syn::visit::visit_path(self, p);
    }
}

/// The names a crate root re-exports from its own modules (`pub use dense::CpuMatrix;`),
/// with the module each comes from.
fn root_reexports(root: &syn::File, modules: &BTreeSet<ModulePath>) -> BTreeMap<String, ModulePath> {
    fn walk(prefix: &mut Vec<String>, tree: &syn::UseTree, out: &mut Vec<(String, Vec<String>)>) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                walk(prefix, &p.tree, out);
                prefix.pop();
            }
            syn::UseTree::Name(n) => out.push((n.ident.to_string(), prefix.clone())),
            syn::UseTree::Rename(r) => out.push((r.rename.to_string(), prefix.clone())),
            syn::UseTree::Glob(_) => {}
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| walk(prefix, t, out)),
        }
    }
    let mut names = Vec::new();
    for item in &root.items {
        if let syn::Item::Use(u) = item
            && matches!(u.vis, syn::Visibility::Public(_))
        {
            walk(&mut Vec::new(), &u.tree, &mut names);
        }
    }
    names
        .into_iter()
        .filter_map(|(name, mut from)| {
            if from.first().is_some_and(|s| s == "crate" || s == "self") {
                from.remove(0);
            }
            modules.contains(&from).then_some((name, from))
        })
        .collect()
}

/// The module a path names: its longest prefix that is a module of the crate, or for a name
/// the root re-exports, the module it comes from.
fn target(
    path: &[String],
    modules: &BTreeSet<ModulePath>,
    reexports: &BTreeMap<String, ModulePath>,
) -> ModulePath {
    let module = (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
        .unwrap_or_default();
    match (module.is_empty(), path.first()) {
        (true, Some(name)) => reexports.get(name).cloned().unwrap_or_default(),
        _ => module,
    }
}

/// Edges between sibling modules, grouped by their parent: `a` → `b` when a file inside `a`
/// names something inside its sibling `b`.
type SiblingGraph = BTreeMap<ModulePath, BTreeMap<String, BTreeSet<String>>>;

/// The sibling graph of a crate given as `(module, source)` pairs (the root among them).
fn sibling_graph(sources: &[(ModulePath, String)]) -> SiblingGraph {
    let modules: BTreeSet<ModulePath> = sources.iter().map(|(m, _)| m.clone()).collect();
    let parsed: Vec<(ModulePath, syn::File)> = sources
        .iter()
        .map(|(m, text)| {
            let file = syn::parse_file(text).unwrap_or_else(|e| panic!("{}: {e}", m.join("::")));
            (m.clone(), file)
        })
        .collect();
    let reexports = parsed
        .iter()
        .find(|(m, _)| m.is_empty())
        .map(|(_, root)| root_reexports(root, &modules))
        .unwrap_or_default();
    let mut graph = SiblingGraph::new();
    for (from, file) in &parsed {
        let mut paths = CratePaths {
            here: from.clone(),
            found: Vec::new(),
        };
        paths.visit_file(file);
        for path in paths.found {
            let to = target(&path, &modules, &reexports);
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            // An ancestor or a descendant (or the module itself): not between siblings.
            if common == from.len() || common == to.len() {
                continue;
            }
            graph
                .entry(from[..common].to_vec())
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    graph
}

/// A crate's `(module, source)` pairs.
fn crate_sources(krate: &Path) -> Vec<(ModulePath, String)> {
    let src = krate.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .iter()
        .map(|f| (module_of(&src, f), std::fs::read_to_string(f).unwrap()))
        .collect()
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

/// Every cycle among sibling modules, as `parent: a → b → a`.
fn sibling_cycles(graph: &SiblingGraph) -> Vec<String> {
    graph
        .iter()
        .filter_map(|(parent, siblings)| {
            let cycle = find_cycle(siblings)?;
            let parent = if parent.is_empty() {
                "crate".to_string()
            } else {
                parent.join("::")
            };
            Some(format!("{parent}: {}", cycle.join(" → ")))
        })
        .collect()
}

/// The workspace's crates, in the direction of the data flow: each may use only crates
/// before it (files → kernels → runtime → generation → evaluation → calibration →
/// quantization → the command line); `testkit` stands beside them.
const CRATES: [&str; 10] = [
    "checkpoint",
    "cpu-kernels",
    "cuda-kernels",
    "tp-runtime",
    "generation",
    "evaluation",
    "awq-calib",
    "awq-pack",
    "pipeline",
    "testkit",
];

#[test]
fn no_crate_has_an_import_cycle_between_sibling_modules() {
    let root = testkit::workspace_root();
    let mut cycles = Vec::new();
    for krate in CRATES {
        let sources = crate_sources(&root.join(krate));
        assert!(sources.len() > 1, "{krate}: no modules found");
        let graph = sibling_graph(&sources);
        cycles.extend(
            sibling_cycles(&graph)
                .into_iter()
                .map(|c| format!("{krate}: {c}")),
        );
    }
    assert!(
        cycles.is_empty(),
        "modules import each other in a cycle:\n{}",
        cycles.join("\n")
    );
}

/// `(module path, source)` for a made-up crate.
fn made_up(files: &[(&str, &str)]) -> Vec<(ModulePath, String)> {
    files
        .iter()
        .map(|(m, text)| {
            let path = m
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            (path, text.to_string())
        })
        .collect()
}

#[test]
fn the_cycle_finder_sees_every_kind_of_path() {
    let root = "mod backend; mod model; pub use backend::cpu::dense::Matrix;";
    // A circle between nested siblings through `super::` imports and a path in code.
    let sources = made_up(&[
        ("", root),
        ("backend", "pub mod cpu; pub trait Backend {} pub use cpu::Cpu;"),
        (
            "backend::cpu",
            "mod amx; mod dense; use super::Backend; pub struct Cpu;",
        ),
        ("backend::cpu::amx", "use super::dense::Layout;"),
        (
            "backend::cpu::dense",
            "pub struct Matrix; fn f() { super::amx::matmul(); }",
        ),
        ("model", "use crate::backend::Backend;"),
    ]);
    assert_eq!(
        sibling_cycles(&sibling_graph(&sources)),
        ["backend::cpu: amx → dense → amx"]
    );
    // Grouped `crate::` imports, and a name the root re-exports: model → backend → model.
    let sources = made_up(&[
        ("", root),
        ("backend", "pub mod cpu; use crate::{model::{Layer}, Error};"),
        ("backend::cpu", "pub mod dense;"),
        ("backend::cpu::dense", "pub struct Matrix;"),
        ("model", "use crate::Matrix; pub struct Layer;"),
    ]);
    assert_eq!(
        sibling_cycles(&sibling_graph(&sources)),
        ["crate: backend → model → backend"]
    );
    // A child using its parent and a test module using `super::*` are not cycles; nor is a
    // one-way chain.
    let sources = made_up(&[
        ("", root),
        (
            "backend",
            "pub mod cpu; pub use cpu::Cpu; use crate::model::Layer;",
        ),
        (
            "backend::cpu",
            "pub mod dense; use super::Backend; #[cfg(test)] mod tests { use super::*; }",
        ),
        (
            "backend::cpu::dense",
            "use crate::backend::cpu::Cpu; pub struct Matrix;",
        ),
        ("model", "pub struct Layer;"),
    ]);
    assert_eq!(sibling_cycles(&sibling_graph(&sources)), Vec::<String>::new());
}

/// Each crate's (non-dev) dependencies on the workspace's other crates, from its Cargo.toml.
fn workspace_dependencies(krate: &str) -> BTreeSet<String> {
    let path = testkit::workspace_root().join(krate).join("Cargo.toml");
    let manifest: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .into_iter()
        .flat_map(|d| d.keys())
        .filter(|name| CRATES.contains(&name.as_str()))
        .cloned()
        .collect()
}

#[test]
fn crates_depend_on_each_other_in_the_direction_of_the_data_flow() {
    let order = &CRATES[..CRATES.len() - 1];
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
