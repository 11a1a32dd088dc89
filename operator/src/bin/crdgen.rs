//! Writes the CustomResourceDefinitions generated from the Rust types to `crds/` (or the directory
//! given as the first argument). Run after changing anything in `api/`.

use std::{fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds"));
    fs::create_dir_all(&dir)?;
    for (name, yaml) in qmesh_api::crd::crd_files()? {
        let path = dir.join(&name);
        fs::write(&path, yaml)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
