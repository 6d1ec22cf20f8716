//! The import graph of `src/` runs one way: a top-level module may use only the modules
//! listed before it in [`LAYERS`], and no two modules import each other, even through an
//! edge [`ALLOWED`] lets through.
//!
//! Read from the source text: every `crate::x` path (in `use` lines and in code, `use
//! crate::{x, y::z}` groups included) and every `super::` chain that climbs out of a
//! top-level module (inline `mod x { .. }` blocks counted as one level deeper). Comments and
//! string literals are not code. Unit tests in `src/` are checked like the rest: they too
//! may use only their own module and the layers below it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first: a module may import only from modules before it.
const LAYERS: &[&str] = &[
    "telemetry",
    "frame",
    "policy",
    "sandbox",
    "firewall",
    "services",
    "dns",
    "stack",
    "egress",
    "datapath",
    "device",
    "control",
    "canary",
    // The binary's own modules (src/main.rs declares them): the command line, on top.
    "cli",
];

/// Upward edges let through while work in flight removes them: none now, and an entry here
/// needs a reason beside it.
const ALLOWED: &[(&str, &str)] = &[];

/// Modules of `src/` outside the layers: their own imports are not checked. None now (the
/// simulated guest left for the moat-sim crate).
const LEAVING: &[&str] = &[];

#[test]
fn top_level_modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = import_graph(&src);
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        if LEAVING.contains(&from.as_str()) {
            continue;
        }
        let Some(from_rank) = rank(from) else {
            wrong.push(format!("{from}: not in the layer table of tests/layers.rs"));
            continue;
        };
        for (to, site) in tos {
            if ALLOWED.contains(&(from.as_str(), to.as_str())) {
                continue;
            }
            match rank(to) {
                Some(to_rank) if to_rank < from_rank => {}
                Some(_) => wrong.push(format!(
                    "{from} -> {to} ({site}): {to} is not below {from} in the layers"
                )),
                None => wrong.push(format!(
                    "{from} -> {to} ({site}): {to} is not in the layer table"
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "upward imports between top-level modules of src/ (order: {}):\n{}",
        LAYERS.join(" < "),
        wrong.join("\n")
    );
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = import_graph(&src);
    let edges: BTreeMap<&str, BTreeSet<&str>> = graph
        .iter()
        .map(|(from, tos)| (from.as_str(), tos.keys().map(String::as_str).collect()))
        .collect();
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle between top-level modules: {}",
            cycle.join(" -> ")
        );
    }
}

/// The checker itself reads paths as intended.
#[test]
fn references_are_read_from_code_only() {
    let text = r#"
use crate::a::B;
use crate::{b, c::{D, E}};
use super::super::d;
// crate::commented
/// `crate::documented`
fn f() { let s = "crate::quoted"; let c = '"'; crate::e::call(); $crate::macro_path(); }
mod inner { use super::super::super::f; use super::g; }
"#;
    let found: BTreeSet<String> = references(text, 2).into_iter().collect();
    let want: BTreeSet<String> = ["a", "b", "c", "d", "e", "f"].map(String::from).into();
    assert_eq!(found, want);
    assert!(
        references("use super::super::x;", 3).is_empty(),
        "stays inside"
    );
}

/// Module -> (module it imports -> one file that does, for the message).
fn import_graph(src: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).expect("under src");
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        // The crate roots (lib.rs, main.rs) sit above every layer.
        if parts.len() < 2 && !is_module_file(&parts) {
            continue;
        }
        let module = parts[0].trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(&file).expect("readable source");
        for to in references(&text, depth(&parts)) {
            if to != module {
                graph
                    .entry(module.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| rel.display().to_string());
            }
        }
        graph.entry(module).or_default();
    }
    graph
}

/// A top-level file such as `src/sandbox.rs` (not a crate root).
fn is_module_file(parts: &[String]) -> bool {
    parts.len() == 1 && parts[0] != "lib.rs" && parts[0] != "main.rs"
}

/// How deep below the crate root a file's module is: `src/a/mod.rs` and `src/a.rs` are 1,
/// `src/a/b.rs` is 2.
fn depth(parts: &[String]) -> usize {
    match parts.last().map(String::as_str) {
        Some("mod.rs") => parts.len() - 1,
        _ => parts.len(),
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("readable dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level modules a file's code refers to, for a file `depth` modules below the
/// crate root.
fn references(text: &str, depth: usize) -> Vec<String> {
    let mut out = references_in_code(&code_only(text), depth);
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// [`references`] in code already stripped of comments and literals.
fn references_in_code(code: &str, depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(ident_char(bytes[i - 1]) || bytes[i - 1] == b'$');
        if starts_word && code[i..].starts_with("mod ") {
            // An inline module: its `super::` chains start one level deeper.
            let name = ident(code[i + 4..].trim_start());
            let after = code[i + 4..].trim_start()[name.len()..].trim_start();
            if !name.is_empty() && after.starts_with('{') {
                let block = balanced(after);
                out.extend(references_in_code(&block[1..block.len() - 1], depth + 1));
                i = code.len() - after.len() + block.len();
                continue;
            }
        }
        if starts_word && code[i..].starts_with("crate::") {
            i += "crate::".len();
            if code[i..].starts_with('{') {
                let group = balanced(&code[i..]);
                out.extend(group_heads(&group[1..group.len().saturating_sub(1)]));
                i += group.len();
            } else {
                let name = ident(&code[i..]);
                i += name.len();
                out.push(name);
            }
            continue;
        }
        if starts_word && code[i..].starts_with("super::") {
            let mut ups = 0;
            let mut j = i;
            while code[j..].starts_with("super::") {
                ups += 1;
                j += "super::".len();
            }
            // Climbing to the crate root: what follows is a top-level module.
            if ups >= depth {
                if code[j..].starts_with('{') {
                    let group = balanced(&code[j..]);
                    out.extend(group_heads(&group[1..group.len().saturating_sub(1)]));
                } else {
                    out.push(ident(&code[j..]));
                }
            }
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// The first path segment of each item of a `use` group: `a, b::{C}, d::e` -> a, b, d.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut level = 0;
    let mut start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => level += 1,
            '}' => level -= 1,
            ',' if level == 0 => start = true,
            c if start && level == 0 && !c.is_whitespace() => {
                heads.push(ident(&group[i..]));
                start = false;
            }
            _ => {}
        }
    }
    heads
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// `s` starts with an opening bracket: the text up to its matching close (or all of it).
fn balanced(s: &str) -> &str {
    let (open, close) = match s.as_bytes().first() {
        Some(b'(') => ('(', ')'),
        Some(b'[') => ('[', ']'),
        _ => ('{', '}'),
    };
    let mut level = 0;
    for (i, c) in s.char_indices() {
        if c == open {
            level += 1;
        } else if c == close {
            level -= 1;
            if level == 0 {
                return &s[..=i];
            }
        }
    }
    s
}

/// The source with comments removed and string and char literals emptied, so that neither
/// a doc comment naming `crate::x` nor a quote in a literal counts as code.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut level = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    level += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    level -= 1;
                    i += 2;
                    if level == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#')))
            && (i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_'))
        {
            // A raw string: r"...", r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1; // the opening quote
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i = j + 1;
        } else if c == '\'' && at(i + 1) == '\\' {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            let mut j = i + 2;
            while j < chars.len() && chars[j] != '\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else if c == '\'' && at(i + 2) == '\'' {
            out.push_str("' '");
            i += 3;
        } else {
            // Everything else, lifetimes included.
            out.push(c);
            i += 1;
        }
    }
    out
}

/// A cycle of the graph, if it has one (as the modules along it, the first repeated last).
fn find_cycle<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(start) = path.iter().position(|n| *n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}
