//! One version of each crate the server's behaviour rests on: a second
//! `tokenizers` (structured-output libraries bring their own, e.g.
//! `toktrie_hf_tokenizers` or `outlines-core`) would tokenize differently
//! from the one that serves, a second `ort` would load ONNX Runtime twice.
//! cargo-deny allows duplicate versions in general (many small ones are
//! harmless); these may not have any. Read from Cargo.lock.

#[test]
fn the_core_crates_have_one_version_each() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let mut versions: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = \"") {
            name = n.strip_suffix('"');
        } else if let (Some(n), Some(v)) = (name, line.strip_prefix("version = \"")) {
            versions.entry(n).or_default().push(v.trim_end_matches('"'));
            name = None;
        }
    }
    for core in ["tokenizers", "ort", "ort-sys", "tonic", "prost", "tokio", "llguidance", "serde_json"] {
        let found = versions.get(core).cloned().unwrap_or_default();
        assert_eq!(found.len(), 1, "{core}: {found:?} in Cargo.lock");
    }
}
