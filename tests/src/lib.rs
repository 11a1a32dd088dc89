//! Test harness: starts real servers for qmesh's integration tests.
//!
//! [`KubeApiServer`] runs etcd + kube-apiserver on free loopback ports (the envtest convention:
//! binaries from `$KUBEBUILDER_ASSETS`, provisioned by `hack/k8s-test-env.sh`) and hands out a
//! `kube::Client` and a kubeconfig for kubectl and helm. Everything is stopped and deleted on drop.
//! With `USE_EXISTING_CLUSTER=true` it uses the cluster of `$KUBECONFIG` instead.

mod apiserver;
pub mod cluster;
pub mod http;
pub mod mesh;
pub mod netns;
mod process;
pub mod proxy;

pub use apiserver::{KubeApiServer, SERVICE_CIDR};
pub use mesh::{Mesh, MeshBuilder, SidecarProcess};
pub use process::{free_port, free_ports_on, wait_for};
pub use proxy::{Proxy, ProxyMode};

/// The repository root, for tests that read `crds/`, `examples/` or `charts/`.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_path_buf()
}
