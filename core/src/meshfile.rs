//! Local mesh files: one multi-document YAML holding the same `Queue` and `Subscription` manifests
//! one would `kubectl apply`, plus one `kind: Sidecar` document per local sidecar. Loading one gives
//! the [`MeshState`] the operator would build from the cluster, so local views equal cluster views.

use std::collections::BTreeMap;

use qmesh_api::{Queue, SidecarDocument, Subscription, Validate};
use serde::Deserialize;

use crate::{MeshState, SidecarInfo, SidecarKey};

/// Why a mesh file was refused. Messages name the document (1-based) and say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum MeshFileError {
    /// Not YAML, or a document does not fit its kind.
    #[error("document {document}: {message}")]
    Parse {
        /// 1-based index of the document in the file.
        document: usize,
        /// What is wrong.
        message: String,
    },
    /// A resource breaks a rule of `validate()`.
    #[error("document {document} ({kind} {name}): {errors}")]
    Invalid {
        /// 1-based index of the document.
        document: usize,
        /// `Queue` or `Subscription`.
        kind: &'static str,
        /// The resource's name.
        name: String,
        /// The broken rules.
        errors: qmesh_api::ValidationErrors,
    },
    /// Two documents of one kind share a namespace and name.
    #[error("document {document}: duplicate {kind} {namespace}/{name}")]
    Duplicate {
        /// 1-based index of the second document.
        document: usize,
        /// Kind of the documents.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// A parsed mesh file.
#[derive(Clone, Debug, Default)]
pub struct MeshFile {
    /// Queues, in file order.
    pub queues: Vec<Queue>,
    /// Subscriptions, in file order.
    pub subscriptions: Vec<Subscription>,
    /// Local sidecars, in file order.
    pub sidecars: Vec<SidecarDocument>,
}

impl MeshFile {
    /// Parses and validates a mesh file's text. Unknown kinds and invalid resources are errors, not
    /// silently skipped: a local mesh should fail loudly where the API server would refuse.
    pub fn parse(text: &str) -> Result<Self, MeshFileError> {
        let mut file = MeshFile::default();
        let mut seen = BTreeMap::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let document = i + 1;
            let parse_err = |message: String| MeshFileError::Parse { document, message };
            let value =
                serde_yaml::Value::deserialize(doc).map_err(|e| parse_err(e.to_string()))?;
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            let api_version = value
                .get("apiVersion")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            if api_version != "qmesh.io/v1alpha1" {
                return Err(parse_err(format!(
                    "apiVersion {api_version:?} is not qmesh.io/v1alpha1"
                )));
            }
            let (kind, namespace, name) = match kind.as_str() {
                "Queue" => {
                    let q: Queue =
                        serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?;
                    let name = q.metadata.name.clone().unwrap_or_default();
                    q.validate().map_err(|errors| MeshFileError::Invalid {
                        document,
                        kind: "Queue",
                        name: name.clone(),
                        errors,
                    })?;
                    let ns = q
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into());
                    file.queues.push(q);
                    ("Queue", ns, name)
                }
                "Subscription" => {
                    let s: Subscription =
                        serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?;
                    let name = s.metadata.name.clone().unwrap_or_default();
                    s.validate().map_err(|errors| MeshFileError::Invalid {
                        document,
                        kind: "Subscription",
                        name: name.clone(),
                        errors,
                    })?;
                    let ns = s
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into());
                    file.subscriptions.push(s);
                    ("Subscription", ns, name)
                }
                "Sidecar" => {
                    let d: SidecarDocument =
                        serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?;
                    if d.spec.peer_address.is_empty() {
                        return Err(parse_err("Sidecar needs spec.peerAddress".into()));
                    }
                    let ns = d
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into());
                    let name = d.metadata.name.clone();
                    file.sidecars.push(d);
                    ("Sidecar", ns, name)
                }
                other => {
                    return Err(parse_err(format!(
                        "kind {other:?} is not one of Queue, Subscription, Sidecar"
                    )));
                }
            };
            if name.is_empty() {
                return Err(parse_err(format!("{kind} needs metadata.name")));
            }
            if seen
                .insert((kind, namespace.clone(), name.clone()), document)
                .is_some()
            {
                return Err(MeshFileError::Duplicate {
                    document,
                    kind,
                    namespace,
                    name,
                });
            }
        }
        Ok(file)
    }

    /// The mesh state these documents describe; every listed sidecar counts as ready.
    pub fn to_state(&self) -> MeshState {
        let mut state = MeshState::default();
        for q in &self.queues {
            state.apply_queue(q.clone());
        }
        for s in &self.subscriptions {
            state.apply_subscription(s.clone());
        }
        for d in &self.sidecars {
            state.apply_sidecar(
                SidecarKey::new(
                    d.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    d.metadata.name.clone(),
                ),
                SidecarInfo {
                    labels: d.metadata.labels.clone(),
                    service_account: d
                        .spec
                        .service_account_name
                        .clone()
                        .unwrap_or_else(|| "default".to_owned()),
                    peer_address: d.spec.peer_address.clone(),
                    ready: true,
                },
            );
        }
        state
    }

    /// The `Sidecar` document of this name (in any namespace).
    pub fn sidecar(&self, name: &str) -> Option<&SidecarDocument> {
        self.sidecars.iter().find(|d| d.metadata.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders}
spec: {deadLetterQueue: orders-dlq, publishers: {matchLabels: {app: checkout}}}
---
apiVersion: qmesh.io/v1alpha1
kind: Queue
metadata: {name: orders-dlq}
spec: {}
---
apiVersion: qmesh.io/v1alpha1
kind: Subscription
metadata: {name: billing}
spec:
  queue: orders
  consumers: {matchLabels: {app: billing}}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: producer, labels: {app: checkout}}
spec: {peerAddress: "127.0.0.1:7001", grpcAddress: "127.0.0.1:7101", httpAddress: "127.0.0.1:7201"}
---
apiVersion: qmesh.io/v1alpha1
kind: Sidecar
metadata: {name: consumer, labels: {app: billing}}
spec: {peerAddress: "127.0.0.1:7002", grpcAddress: "127.0.0.1:7102", httpAddress: "127.0.0.1:7202"}
"#;

    #[test]
    fn a_mesh_file_gives_each_sidecar_its_view() {
        let file = MeshFile::parse(MESH).unwrap();
        assert_eq!(
            (
                file.queues.len(),
                file.subscriptions.len(),
                file.sidecars.len()
            ),
            (2, 1, 2)
        );
        let state = file.to_state();
        let producer = state
            .view_for(&SidecarKey::new("default", "producer"))
            .unwrap();
        let route = &producer.queue("orders").unwrap().routes[0];
        assert_eq!(route.consumers[0].peer_address, "127.0.0.1:7002");
        let consumer = state
            .view_for(&SidecarKey::new("default", "consumer"))
            .unwrap();
        assert_eq!(consumer.subscriptions[0].owners[0].name, "producer");
        assert_eq!(
            file.sidecar("consumer").unwrap().spec.grpc_address,
            "127.0.0.1:7102"
        );
    }

    #[test]
    fn invalid_resources_are_refused_with_what_to_fix() {
        let text = MESH.replace("deadLetterQueue: orders-dlq,", "deadLetterQueue: orders,");
        let err = MeshFile::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("document 1") && err.contains("spec.deadLetterQueue"),
            "{err}"
        );
    }

    #[test]
    fn unknown_kinds_duplicates_and_garbage_are_refused() {
        let err =
            MeshFile::parse("apiVersion: qmesh.io/v1alpha1\nkind: Topic\nmetadata: {name: x}\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("Topic"), "{err}");
        let twice = format!("{MESH}---\n{}", MESH.split("---").nth(1).unwrap());
        assert!(matches!(
            MeshFile::parse(&twice),
            Err(MeshFileError::Duplicate { document: 6, .. })
        ));
        assert!(MeshFile::parse("{{{{ not yaml").is_err());
        assert!(MeshFile::parse("apiVersion: v1\nkind: Pod\n").is_err());
    }
}
