//! Imports inside `src/` flow one way: no cycle between files, none between
//! the crate's top-level modules (a folder or file directly under `src/`).
//! An arrow A → B means A names something of B through a `crate::`,
//! `super::` or `self::` path (resolved to the file that defines the
//! module); a module using its own submodules is not counted. The checker is
//! tried on a small tree with a cycle first, so it cannot pass by finding
//! nothing.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every module of the tree under `src`, with its file.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    files.into_iter().map(|f| (module_of(&f, src), f)).collect()
}

fn module_of(f: &Path, src: &Path) -> Module {
    let rel = f.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The `crate::`/`super::`/`self::` paths of a file (comments left out), as segments.
fn paths(text: &str) -> Vec<Vec<String>> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let first = &code[start..i];
        if !matches!(first, "crate" | "super" | "self") {
            continue;
        }
        let mut segs = vec![first.to_string()];
        while code[i..].starts_with("::") && bytes.get(i + 2).is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_') {
            let s = i + 2;
            i = s;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            segs.push(code[s..i].to_string());
        }
        if segs.len() > 1 {
            out.push(segs);
        }
    }
    out
}

/// Arrows between files.
fn edges(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mods = modules(src);
    let mut out: BTreeMap<PathBuf, BTreeSet<PathBuf>> = mods.values().map(|f| (f.clone(), BTreeSet::new())).collect();
    for (module, file) in &mods {
        for segs in paths(&std::fs::read_to_string(file).unwrap()) {
            let (mut base, mut rest): (Module, &[String]) = match segs[0].as_str() {
                "crate" => (Vec::new(), &segs[1..]),
                "self" => (module.clone(), &segs[1..]),
                _ => (module[..module.len().saturating_sub(1)].to_vec(), &segs[1..]),
            };
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            let target = (0..=rest.len()).rev().find_map(|k| {
                let cand: Module = base.iter().chain(&rest[..k]).cloned().collect();
                mods.get(&cand).map(|f| (cand, f))
            });
            let Some((tmod, target)) = target else { continue };
            if target == file || (tmod.len() > module.len() && tmod[..module.len()] == module[..]) {
                continue;
            }
            out.get_mut(file).unwrap().insert(target.clone());
        }
    }
    out
}

/// The same arrows between top-level modules.
fn top_level(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>, src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let top = |f: &Path| {
        let first = f.strip_prefix(src).unwrap().iter().next().unwrap().to_string_lossy().into_owned();
        first.strip_suffix(".rs").map(str::to_string).unwrap_or(first)
    };
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (f, targets) in graph {
        let from = top(f);
        let to: BTreeSet<String> = targets.iter().map(|t| top(t)).filter(|t| *t != from).collect();
        for t in &to {
            out.entry(t.clone()).or_default();
        }
        out.entry(from).or_default().extend(to);
    }
    out
}

/// The strongly connected components of more than one node (Tarjan).
fn cycles<T: Ord + Clone>(graph: &BTreeMap<T, BTreeSet<T>>) -> Vec<Vec<T>> {
    struct State<T> {
        index: BTreeMap<T, usize>,
        low: BTreeMap<T, usize>,
        stack: Vec<T>,
        on: BTreeSet<T>,
        found: Vec<Vec<T>>,
    }
    fn strong<T: Ord + Clone>(v: &T, g: &BTreeMap<T, BTreeSet<T>>, s: &mut State<T>) {
        let n = s.index.len();
        s.index.insert(v.clone(), n);
        s.low.insert(v.clone(), n);
        s.stack.push(v.clone());
        s.on.insert(v.clone());
        for w in &g[v] {
            if !s.index.contains_key(w) {
                strong(w, g, s);
                let l = s.low[v].min(s.low[w]);
                s.low.insert(v.clone(), l);
            } else if s.on.contains(w) {
                let l = s.low[v].min(s.index[w]);
                s.low.insert(v.clone(), l);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(&w);
                let done = &w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.found.push(comp);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            strong(v, graph, &mut s);
        }
    }
    s.found
}

/// Every cycle of the tree under `src`, one line each.
fn report(src: &Path) -> Vec<String> {
    let g = edges(src);
    let name = |f: &PathBuf| f.strip_prefix(src).unwrap().display().to_string();
    let mut out: Vec<String> =
        cycles(&g).iter().map(|c| format!("files: {}", c.iter().map(name).collect::<Vec<_>>().join(", "))).collect();
    out.sort();
    out.extend(cycles(&top_level(&g, src)).iter().map(|c| format!("top-level modules: {}", c.join(", "))));
    out
}

#[test]
fn the_checker_finds_cycles_between_files_and_between_top_level_modules() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |p: &str, text: &str| {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\n");
    write("a/mod.rs", "pub mod x;\npub mod y;\npub struct A;\nuse crate::b::Thing; // crate::b is named\n");
    write("a/x.rs", "use super::y::Y;\npub struct X;\n");
    write("a/y.rs", "use super::x::X;\n// use crate::b::Nothing;  (a comment does not count)\npub struct Y;\n");
    write("b.rs", "use crate::a::A;\npub struct Thing;\nfn f() -> crate::a::x::X { todo!() }\n");
    let found = report(src);
    assert_eq!(
        found,
        vec![
            "files: a/mod.rs, b.rs".to_string(),
            "files: a/x.rs, a/y.rs".to_string(),
            "top-level modules: a, b".to_string(),
        ],
        "{found:?}"
    );
    // Broken both ways: no cycle, and a parent using its children counts for nothing.
    write("b.rs", "pub struct Thing;\n");
    write("a/y.rs", "pub struct Y;\n");
    write("a/mod.rs", "pub mod x;\npub mod y;\nuse self::x::X;\nuse crate::b::Thing;\n");
    assert!(report(src).is_empty(), "{:?}", report(src));
}

#[test]
fn imports_inside_src_flow_one_way() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = report(&src);
    assert!(found.is_empty(), "import cycles in src/ (move what both sides use below both):\n{}", found.join("\n"));
}
