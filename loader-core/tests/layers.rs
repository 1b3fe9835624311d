//! The crate's modules form layers: each uses only modules declared before it in
//! `lib.rs` (docs/ARCHITECTURE.md). This test reads the sources and fails naming every
//! `crate::` path that points up or sideways-up, including paths through the root
//! re-exports (`crate::Loader` is the pipeline). Unit tests (`#[cfg(test)]` to the end
//! of a file) may use higher layers, as integration tests do.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Drops `//` comments (line and doc) so prose that names a module is not a use.
fn strip_comments(text: &str) -> String {
    text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

/// The modules in declaration order, and the module each root re-export comes from.
fn layers() -> (Vec<String>, HashMap<String, String>) {
    let lib = strip_comments(&std::fs::read_to_string(src().join("lib.rs")).unwrap());
    let mut order = Vec::new();
    for line in lib.lines() {
        let l = line.trim();
        if let Some(m) = l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod ")) {
            if let Some(name) = m.strip_suffix(';') {
                order.push(name.trim().to_owned());
            }
        }
    }
    let mut reexports = HashMap::new();
    for stmt in lib.split(';') {
        let Some(at) = stmt.find("pub use ") else { continue };
        let Some((module, items)) = stmt[at + "pub use ".len()..].split_once("::") else { continue };
        if !order.iter().any(|m| m == module.trim()) {
            continue;
        }
        for item in top_level_items(items) {
            let last = item.rsplit(" as ").next().unwrap_or(&item).trim();
            let name = last.rsplit("::").next().unwrap_or(last).trim();
            reexports.insert(name.to_owned(), module.trim().to_owned());
        }
    }
    (order, reexports)
}

/// `{a, b::c, d as e}` -> ["a", "b::c", "d as e"]; a plain path -> [path].
fn top_level_items(s: &str) -> Vec<String> {
    let s = s.trim();
    let Some(inner) = s.strip_prefix('{') else { return vec![s.to_owned()] };
    let mut items = Vec::new();
    let (mut depth, mut cur) = (0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    items.push(cur);
    items.into_iter().map(|i| i.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|i| !i.is_empty()).collect()
}

/// Every first path segment after `crate::` in `text`.
fn crate_uses(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let end = if after.starts_with('{') {
            after.find('}').map_or(after.len(), |e| e + 1)
        } else {
            after.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(after.len())
        };
        for item in top_level_items(&after[..end]) {
            out.push(item.split("::").next().unwrap_or("").trim().to_owned());
        }
        rest = &after[end..];
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "bin") {
                rs_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let (order, reexports) = layers();
    assert!(order.len() >= 10 && order[0] == "error", "lib.rs module list not found: {order:?}");
    let rank: HashMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut files = Vec::new();
    rs_files(&src(), &mut files);
    let mut violations = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src()).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" {
            continue;
        }
        let Some(&me) = rank.get(module.as_str()) else {
            violations.push(format!("{}: module {module:?} is not declared in lib.rs", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        let text = strip_comments(text.split("#[cfg(test)]").next().unwrap_or(""));
        for dep in crate_uses(&text) {
            let target = if rank.contains_key(dep.as_str()) { Some(dep.clone()) } else { reexports.get(&dep).cloned() };
            let Some(target) = target else { continue };
            if target != module && rank[target.as_str()] > me {
                violations.push(format!("{}: {module} uses crate::{dep} ({target}), a layer above it", rel.display()));
            }
        }
    }
    violations.sort();
    violations.dedup();
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_an_upward_use() {
    // The parser must find uses in every form the code writes them, or the test above
    // would pass vacuously.
    let uses = crate_uses("use crate::{error::Error, pipeline::{Loader, Next}};\nlet x = crate::remote::Location::parse(s);\ncrate::Loader::builder(p)");
    assert_eq!(uses, ["error", "pipeline", "remote", "Loader"]);
    let (order, reexports) = layers();
    assert_eq!(reexports.get("Loader").map(String::as_str), Some("pipeline"));
    assert_eq!(reexports.get("run_bench").map(String::as_str), Some("bench"));
    assert!(order.iter().position(|m| m == "error") < order.iter().position(|m| m == "pipeline"));
}
