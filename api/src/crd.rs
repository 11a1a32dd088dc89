//! The CustomResourceDefinitions as YAML, rendered from the Rust types. `crdgen` writes them to
//! `crds/`; a test fails when the committed files differ from what the types produce.

use kube::CustomResourceExt;

use crate::{Queue, Subscription};

const HEADER: &str = "# Generated from the Rust types in api/ by `cargo run -p qmesh-operator --bin crdgen`.\n\
# Do not edit by hand.\n";

/// `(file name, YAML)` for every CRD, in a stable order.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    [Queue::crd(), Subscription::crd()]
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"));
            Ok((name, format!("{HEADER}{}", serde_yaml::to_string(&crd)?)))
        })
        .collect()
}
