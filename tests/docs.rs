//! The documentation stays true: the flag reference in `docs/serving.md` is
//! what clap defines (rewrite it with `BATCHGEN_BLESS=1 cargo test --test
//! docs`), every relative link and `#anchor` in the Markdown files points at
//! a file and a heading that exist, and the README stays a front page.
//! (The docs' commands are run by `scripts/doc_test.py`.)
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const BEGIN: &str = "<!-- flag reference: generated from the clap definitions by tests/docs.rs -->\n";
const END: &str = "<!-- end of flag reference -->\n";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_flag_reference_is_the_one_clap_defines() {
    let path = root().join("docs/serving.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let (start, end) = match (text.find(BEGIN), text.find(END)) {
        (Some(s), Some(e)) if s < e => (s + BEGIN.len(), e),
        _ => panic!("docs/serving.md has no block between {BEGIN:?} and {END:?}"),
    };
    let generated = batchgen::config::flag_reference();
    if text[start..end] == generated {
        return;
    }
    if std::env::var_os("BATCHGEN_BLESS").is_some() {
        std::fs::write(&path, format!("{}{generated}{}", &text[..start], &text[end..])).unwrap();
        return;
    }
    panic!(
        "docs/serving.md's flag reference differs from the flags; run `BATCHGEN_BLESS=1 cargo test --test docs` \
         and commit the result. Generated:\n{generated}"
    );
}

#[test]
fn the_generated_reference_names_every_serve_flag_with_its_env_and_default() {
    let reference = batchgen::config::flag_reference();
    for row in [
        "| `--model` | `BATCHGEN_MODEL` |  |",
        "| `--max-batch-size` | `BATCHGEN_MAX_BATCH_SIZE` | `32` |",
        "| `--prefix-cache` | `BATCHGEN_PREFIX_CACHE` | `auto` |",
        "| `--log-prompts` | `BATCHGEN_LOG_PROMPTS` |  |",
    ] {
        assert!(reference.contains(row), "no {row:?} in:\n{reference}");
    }
    assert!(reference.contains("Values: `auto`, `on`, `off`."), "{reference}");
    for heading in ["Model and precision", "Limits and scheduling", "Security", "Prefix cache"] {
        assert!(reference.contains(&format!("### {heading}\n")), "{reference}");
    }
    assert!(!reference.contains("`--help`"), "{reference}");
}

/// The Markdown files of the repository (README, docs/).
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The text outside fenced code blocks and inline code spans.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// Link targets: `[text](target)` and `![alt](target)`.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut out = Vec::new();
    let mut rest = prose.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                out.push(after[..j].trim().to_string());
                rest = &after[j..];
            }
            None => break,
        }
    }
    out
}

/// GitHub's anchors of a file's headings: lower case, punctuation dropped,
/// spaces to hyphens (numbered when repeated).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut candidate = slug.clone();
        let mut n = 1;
        while seen.contains(&candidate) {
            candidate = format!("{slug}-{n}");
            n += 1;
        }
        seen.insert(candidate);
    }
    seen
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") || link.starts_with("mailto:") {
                continue; // no network here: external links are not checked
            }
            checked += 1;
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() { file.clone() } else { dir.join(path) };
            let name = file.strip_prefix(root()).unwrap().display().to_string();
            if !target.exists() {
                broken.push(format!("{name}: {link} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor {
                let heads = anchors(&std::fs::read_to_string(&target).unwrap_or_default());
                if !heads.contains(anchor) {
                    broken.push(format!("{name}: {link} (no heading with that anchor)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 20, "only {checked} links checked: is the parser broken?");
}

#[test]
fn the_link_checker_finds_broken_links_and_anchors() {
    let text = "# A title\n## Two words\n[ok](#two-words) `[not](a link)` [bad](#nope)\n```\n[x](y)\n```\n";
    assert_eq!(links(text), vec!["#two-words", "#nope"]);
    let a = anchors(text);
    assert!(a.contains("two-words") && a.contains("a-title") && !a.contains("nope"));
    assert_eq!(anchors("# Prefix cache: on/off (2026)\n"), BTreeSet::from(["prefix-cache-onoff-2026".to_string()]));
}

#[test]
fn the_readme_is_a_front_page() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 150, "README.md has {lines} lines; keep it to 150 and put depth in docs/");
    for guide in ["serving", "api", "decoding", "operations", "deploy", "architecture", "development", "performance"] {
        let link = format!("docs/{guide}.md");
        assert!(readme.contains(&link), "the README's map of docs/ has no {link}");
        assert!(Path::new(&root().join(&link)).is_file(), "{link} is missing");
    }
}

#[test]
fn every_metric_is_in_the_operations_guide() {
    let telemetry = std::fs::read_to_string(root().join("src/telemetry.rs")).unwrap();
    let guide = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let names: Vec<&str> = telemetry
        .split('"')
        .filter(|s| s.starts_with("batchgen_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(names.len() > 30, "{names:?}");
    let missing: Vec<&&str> = names.iter().filter(|n| !guide.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "metrics missing from docs/operations.md's table: {missing:?}");
}
