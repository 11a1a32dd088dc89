//! The `Sidecar` document of a local mesh file: one per sidecar process run without Kubernetes,
//! standing in for the Pod (name, namespace, labels) and saying where the sidecar listens.
//! It is not a CRD: the operator learns the same facts from Pods.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `kind: Sidecar` in a mesh file.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarDocument {
    /// Must be `qmesh.io/v1alpha1`.
    pub api_version: String,
    /// Must be `Sidecar`.
    pub kind: String,
    /// Name, namespace (default `default`) and labels, as a Pod would have them.
    pub metadata: SidecarMetadata,
    /// Where the sidecar listens.
    pub spec: SidecarSpec,
}

/// The Pod-like identity of a local sidecar.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarMetadata {
    /// Sidecar name, unique in its namespace.
    pub name: String,
    /// Namespace; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels matched by Queue `publishers` and Subscription `consumers` selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Listen addresses of a local sidecar (`host:port`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Peer API (other sidecars connect here).
    pub peer_address: String,
    /// App gRPC API (loopback).
    pub grpc_address: String,
    /// App HTTP API (loopback).
    pub http_address: String,
    /// Health and Prometheus metrics.
    #[serde(default)]
    pub admin_address: String,
    /// AMQP 0-9-1 for RabbitMQ client code (loopback); none = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_address: Option<String>,
    /// The service account it runs as, for `serviceAccounts` in selectors (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}
