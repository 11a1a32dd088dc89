//! The committed `crds/` must be exactly what the Rust types produce.

#![allow(clippy::unwrap_used)]

use std::{fs, path::Path};

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let files = qmesh_api::crd::crd_files().expect("CRDs render to YAML");
    let mut stale = Vec::new();
    for (name, yaml) in &files {
        match fs::read_to_string(dir.join(name)) {
            Ok(committed) if committed == *yaml => {}
            _ => stale.push(name.clone()),
        }
    }
    let mut committed: Vec<String> = fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| {
            e.expect("readable crds/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    committed.sort();
    let mut expected: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert!(
        stale.is_empty() && committed == expected,
        "crds/ is stale ({stale:?} differ; committed {committed:?}, expected {expected:?}): \
         run `cargo run -p qmesh-operator --bin crdgen` and commit the result"
    );
}
